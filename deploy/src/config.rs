//! The manifest's `deploy` section: parsed into typed structs and validated here, with the
//! runtime sections, before any AWS call. Every error names the JSON path of the offending
//! value, like `$.deploy.services.server.cpu`. Secrets stay out of the file: the section maps
//! the environment variables that the runtime sections name (`*_env`) to Secrets Manager or
//! SSM Parameter Store ARNs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fjord_config::{Manifest, ManifestError};
use serde::{Deserialize, Serialize};

/// Environment variables that the deploy sets itself; the manifest may not map them.
pub const RESERVED_ENV: [&str; 5] = [
    "FJORD_MANIFEST_JSON",
    "FJORD_MANIFEST",
    "FJORD_CONSUMER_GROUP",
    "FJORD_EMF_CLUSTER",
    "FJORD_EMF_SERVICE",
];

/// Why a manifest cannot be deployed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The OS error is part of the message, not a source:
    /// `fjord-deploy` prints an error's message alone, each cause once.
    #[error("cannot read manifest {}: {error}", file.display())]
    Read {
        /// The manifest's path.
        file: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A runtime section is invalid (the same check every binary makes at start); the
    /// error names the file.
    #[error(transparent)]
    Runtime(ManifestError),
    /// The `deploy` section is missing, malformed or out of range.
    #[error("{}: {path}: {message}", file.display())]
    Invalid {
        /// The manifest's path.
        file: PathBuf,
        /// The JSON path of the value, `$.deploy.services.server.cpu`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A manifest that can be deployed: the runtime sections, the typed `deploy` section, and
/// the manifest text the tasks get (the file without its `deploy` section).
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The validated runtime sections.
    pub manifest: Manifest,
    /// The validated `deploy` section.
    pub deploy: DeployConfig,
    /// The manifest as the tasks read it: compact JSON, without `deploy` and `$schema`.
    pub runtime_manifest: String,
}

/// `deploy`: where and how Fjord runs in AWS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// The AWS region, like `eu-west-1`.
    pub region: String,
    /// The ECS cluster the services run in (must exist).
    pub cluster: String,
    /// Prefix of every name the deploy creates: repositories, task families, services.
    #[serde(default = "default_name")]
    pub name: String,
    /// The CPU architecture the images were built for.
    #[serde(default)]
    pub architecture: Architecture,
    /// Where the tasks run.
    pub network: NetworkConfig,
    /// The IAM roles of the tasks.
    pub roles: RolesConfig,
    /// Where the tasks' logs go.
    pub logs: LogsConfig,
    /// Environment variable → Secrets Manager or SSM parameter ARN, injected by ECS.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// The customer-managed KMS keys that encrypt those secrets: the execution role may
    /// decrypt with them.
    #[serde(default)]
    pub kms_key_arns: Vec<String>,
    /// Sizes and scaling of the services.
    pub services: ServicesConfig,
    /// What `fjord-deploy bootstrap` creates; a deploy ignores it.
    #[serde(default)]
    pub bootstrap: BootstrapConfig,
}

/// `deploy.bootstrap`: the shape of what `fjord-deploy bootstrap` creates. Each part it
/// would create is used as it is instead when the manifest already names one: the tasks'
/// subnets (`deploy.network.subnets`, a VPC of your own), their security groups, the
/// target group, the cluster, the roles; Redis when `redis.create` is false.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// Availability zones the VPC spans: 2 or 3.
    #[serde(default = "default_zones")]
    pub availability_zones: u8,
    /// One NAT gateway for all zones (cheaper), or one per zone (a zone's outage does not
    /// cut the others off from Kafka).
    #[serde(default)]
    pub nat_gateways: NatGateways,
    /// The new VPC's address range, `/16` to `/23`; each subnet gets a sixteenth of it
    /// (a /27 at the least, the smallest subnet an Application Load Balancer takes).
    #[serde(default = "default_vpc_cidr")]
    pub vpc_cidr: String,
    /// Public subnets for the load balancer, needed only with a VPC of your own.
    #[serde(default)]
    pub load_balancer_subnets: Vec<String>,
    /// An ACM certificate: the load balancer listens with HTTPS on 443 (and redirects 80);
    /// without one it listens with HTTP on 80.
    #[serde(default)]
    pub certificate_arn: Option<String>,
    /// The ElastiCache replication group.
    #[serde(default)]
    pub redis: RedisBootstrap,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        Self {
            availability_zones: default_zones(),
            nat_gateways: NatGateways::default(),
            vpc_cidr: default_vpc_cidr(),
            load_balancer_subnets: Vec::new(),
            certificate_arn: None,
            redis: RedisBootstrap::default(),
        }
    }
}

/// `deploy.bootstrap.nat_gateways`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NatGateways {
    /// One NAT gateway, in the first zone, for every private subnet.
    #[default]
    One,
    /// One NAT gateway in each zone.
    PerZone,
}

/// `deploy.bootstrap.redis`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisBootstrap {
    /// Whether bootstrap creates ElastiCache; false: `redis.url` names your own Redis.
    #[serde(default = "default_true")]
    pub create: bool,
    /// `valkey` or `redis`.
    #[serde(default = "default_engine")]
    pub engine: String,
    /// The node type, like `cache.t4g.micro`.
    #[serde(default = "default_node_type")]
    pub node_type: String,
}

impl Default for RedisBootstrap {
    fn default() -> Self {
        Self {
            create: true,
            engine: default_engine(),
            node_type: default_node_type(),
        }
    }
}

/// The CPU architecture of the images and of the Fargate tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// `x86_64-linux` images.
    #[default]
    X86_64,
    /// `aarch64-linux` images (Graviton).
    Arm64,
}

/// `deploy.network`: the awsvpc configuration of every task.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Subnet ids, private subnets with a NAT gateway in the usual setup.
    pub subnets: Vec<String>,
    /// Security group ids.
    pub security_groups: Vec<String>,
    /// Whether tasks get a public IP (only for public subnets without NAT).
    #[serde(default)]
    pub assign_public_ip: bool,
}

/// `deploy.roles`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesConfig {
    /// The role ECS uses to pull images, write logs and read the secrets.
    pub execution_role_arn: String,
    /// The role the processes run as, if they need one.
    #[serde(default)]
    pub task_role_arn: Option<String>,
}

/// `deploy.logs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// The CloudWatch Logs group; created when missing.
    pub group: String,
    /// Days to keep the logs, set when the deploy creates the group.
    #[serde(default)]
    pub retention_days: Option<i32>,
}

/// `deploy.services`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    /// The HTTP tier.
    pub server: ServerService,
    /// Every consumer group's service (one task per group member).
    pub consumer: TaskSize,
}

/// Fargate CPU units and memory (MiB) of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSize {
    /// CPU units: 256, 512, 1024, 2048, 4096, 8192 or 16384.
    pub cpu: u32,
    /// Memory in MiB, within what Fargate allows for `cpu`.
    pub memory: u32,
}

/// `deploy.services.server`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerService {
    /// CPU units of a task.
    pub cpu: u32,
    /// Memory of a task, MiB.
    pub memory: u32,
    /// The ALB target group (target type `ip`) the server tasks register with.
    pub target_group_arn: String,
    /// Tasks when the service is created; afterwards autoscaling owns the count.
    #[serde(default = "default_server_count")]
    pub desired_count: u32,
    /// Seconds ECS ignores failing load balancer health checks after a task starts.
    #[serde(default = "default_grace_secs")]
    pub health_check_grace_secs: u32,
    /// Target tracking on CPU and on open connections per task.
    pub autoscaling: AutoscalingConfig,
}

impl ServerService {
    /// The task size.
    pub fn size(&self) -> TaskSize {
        TaskSize {
            cpu: self.cpu,
            memory: self.memory,
        }
    }
}

/// `deploy.services.server.autoscaling`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscalingConfig {
    /// Fewest tasks.
    pub min_count: u32,
    /// Most tasks.
    pub max_count: u32,
    /// Average CPU utilisation to hold, percent.
    #[serde(default = "default_cpu_target")]
    pub cpu_target: f64,
    /// Open SSE connections per task to hold.
    pub connections_target: f64,
    /// Seconds between scale-in steps.
    #[serde(default = "default_scale_in_cooldown")]
    pub scale_in_cooldown_secs: i32,
    /// Seconds between scale-out steps.
    #[serde(default = "default_scale_out_cooldown")]
    pub scale_out_cooldown_secs: i32,
}

fn default_name() -> String {
    "fjord".into()
}
fn default_zones() -> u8 {
    2
}
fn default_vpc_cidr() -> String {
    "10.0.0.0/16".into()
}
fn default_true() -> bool {
    true
}
fn default_engine() -> String {
    "valkey".into()
}
fn default_node_type() -> String {
    "cache.t4g.micro".into()
}
fn default_server_count() -> u32 {
    2
}
fn default_grace_secs() -> u32 {
    60
}
fn default_cpu_target() -> f64 {
    60.0
}
fn default_scale_in_cooldown() -> i32 {
    300
}
fn default_scale_out_cooldown() -> i32 {
    60
}

/// The manifest's text, read from `file`.
fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|error| ConfigError::Read {
        file: file.to_owned(),
        error,
    })
}

/// The manifest as the server parses it; `file` names it in errors.
fn runtime(text: &str, file: &Path) -> Result<Manifest, ConfigError> {
    Manifest::parse(text).map_err(|error| ConfigError::Runtime(error.in_file(file)))
}

impl Deployment {
    /// Reads the manifest at `file` and validates all of it.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(file)?, file)
    }

    /// Validates a manifest's text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let manifest = runtime(text, file)?;
        Self::with_deploy(text, manifest).map_err(|Bad { path, message }| ConfigError::Invalid {
            file: file.to_owned(),
            path,
            message,
        })
    }

    fn with_deploy(text: &str, manifest: Manifest) -> Result<Self, Bad> {
        let deploy: DeployConfig = section(&manifest)?;
        deploy.validate(&manifest)?;
        let mut runtime: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|error| Bad::at("$", error.to_string()))?;
        runtime.remove("deploy");
        runtime.remove("$schema");
        // A task listens where the load balancer reaches it, its network interface, whether
        // or not access control is on: the runtime's default without it is loopback, which
        // only the health check would reach. The task's security groups and the load
        // balancer decide who gets there; a manifest that names a host keeps it.
        if let Some(server) = runtime
            .entry("server")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
        {
            server
                .entry("host")
                .or_insert_with(|| std::net::Ipv4Addr::UNSPECIFIED.to_string().into());
        }
        let runtime_manifest = serde_json::Value::Object(runtime).to_string();
        Ok(Self {
            manifest,
            deploy,
            runtime_manifest,
        })
    }
}

/// The `deploy` section as `T`, with the JSON path of the first value that does not fit.
fn section<T: serde::de::DeserializeOwned>(manifest: &Manifest) -> Result<T, Bad> {
    let section = manifest.deploy.clone().ok_or_else(|| {
        Bad::at(
            "$.deploy",
            "missing: fjord-deploy needs the deploy section (see the deployment guide)",
        )
    })?;
    serde_path_to_error::deserialize(section).map_err(|error| {
        let path = error.path().to_string();
        let path = if path == "." {
            "$.deploy".to_owned()
        } else {
            format!("$.deploy.{path}")
        };
        Bad::at(
            path,
            fjord_config::without_values(&error.inner().to_string()),
        )
    })
}

/// A manifest as `fjord-deploy bootstrap` reads it: the runtime sections validated as
/// every binary validates them, and of the `deploy` section what bootstrap needs, where
/// the parts it can create may still be missing. What it writes back is then checked
/// whole, as a deploy reads it.
#[derive(Debug, Clone)]
pub struct Blueprint {
    /// The validated runtime sections.
    pub manifest: Manifest,
    /// The `deploy` section as far as bootstrap reads it.
    pub deploy: BootstrapSection,
}

/// The `deploy` section as bootstrap reads it. Unknown fields are left to the full check
/// of the manifest it writes.
#[derive(Debug, Clone, Deserialize)]
pub struct BootstrapSection {
    /// `$.deploy.region`.
    pub region: String,
    /// `$.deploy.name`: names and tags everything bootstrap creates.
    #[serde(default = "default_name")]
    pub name: String,
    /// `$.deploy.cluster`, when named.
    #[serde(default)]
    pub cluster: Option<String>,
    /// `$.deploy.network`, as far as it is filled in.
    #[serde(default)]
    pub network: PartialNetwork,
    /// `$.deploy.roles`, as far as it is filled in.
    #[serde(default)]
    pub roles: PartialRoles,
    /// `$.deploy.logs`.
    #[serde(default)]
    pub logs: Option<LogsConfig>,
    /// `$.deploy.secrets`.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// `$.deploy.kms_key_arns`.
    #[serde(default)]
    pub kms_key_arns: Vec<String>,
    /// `$.deploy.services`, for the target group only.
    #[serde(default)]
    pub services: Option<PartialServices>,
    /// `$.deploy.bootstrap`.
    #[serde(default)]
    pub bootstrap: BootstrapConfig,
}

/// `$.deploy.network` before bootstrap.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PartialNetwork {
    /// The tasks' subnets: a VPC of your own.
    #[serde(default)]
    pub subnets: Vec<String>,
    /// The tasks' security groups.
    #[serde(default)]
    pub security_groups: Vec<String>,
}

/// `$.deploy.roles` before bootstrap.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PartialRoles {
    /// An execution role of your own.
    #[serde(default)]
    pub execution_role_arn: Option<String>,
    /// A task role of your own.
    #[serde(default)]
    pub task_role_arn: Option<String>,
}

/// `$.deploy.services` before bootstrap.
#[derive(Debug, Clone, Deserialize)]
pub struct PartialServices {
    /// `$.deploy.services.server`.
    #[serde(default)]
    pub server: Option<PartialServer>,
}

/// `$.deploy.services.server` before bootstrap.
#[derive(Debug, Clone, Deserialize)]
pub struct PartialServer {
    /// A target group of your own.
    #[serde(default)]
    pub target_group_arn: Option<String>,
}

impl BootstrapSection {
    /// The target group the manifest names.
    pub fn target_group_arn(&self) -> Option<&str> {
        self.services
            .as_ref()?
            .server
            .as_ref()?
            .target_group_arn
            .as_deref()
    }

    /// The cluster's name: the one named, else the deployment's.
    pub fn cluster_name(&self) -> &str {
        self.cluster.as_deref().unwrap_or(&self.name)
    }

    /// The log group's name: the one named, else `/ecs/<name>`.
    pub fn log_group(&self) -> String {
        self.logs
            .as_ref()
            .map_or_else(|| format!("/ecs/{}", self.name), |logs| logs.group.clone())
    }
}

/// The longest `$.deploy.name` bootstrap takes: the target group's name, `<name>-server`,
/// has at most 32 characters.
pub const BOOTSTRAP_NAME_MAX: usize = 25;

impl Blueprint {
    /// Reads the manifest at `file` and validates what bootstrap needs of it.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(file)?, file)
    }

    /// Validates a manifest's text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let manifest = runtime(text, file)?;
        let invalid = |Bad { path, message }| ConfigError::Invalid {
            file: file.to_owned(),
            path,
            message,
        };
        let deploy: BootstrapSection = section(&manifest).map_err(invalid)?;
        deploy.validate(&manifest).map_err(invalid)?;
        Ok(Self { manifest, deploy })
    }
}

impl BootstrapSection {
    fn validate(&self, manifest: &Manifest) -> Result<(), Bad> {
        validate_region_and_name(&self.region, &self.name)?;
        require(
            self.name.len() <= BOOTSTRAP_NAME_MAX,
            "$.deploy.name",
            || {
                format!(
                    "{:?} is longer than the {BOOTSTRAP_NAME_MAX} characters bootstrap allows (the target group is named <name>-server, at most 32)",
                    self.name
                )
            },
        )?;
        validate_server(manifest)?;
        validate_ids(&self.network.subnets, "subnet-", "$.deploy.network.subnets")?;
        validate_ids(
            &self.network.security_groups,
            "sg-",
            "$.deploy.network.security_groups",
        )?;
        require(
            self.network.security_groups.is_empty() || !self.network.subnets.is_empty(),
            "$.deploy.network.security_groups",
            || {
                "security groups belong to a VPC: name that VPC's subnets in $.deploy.network.subnets too, or leave both out for bootstrap to create them".into()
            },
        )?;
        self.bootstrap.validate()
    }
}

/// A refused value of the `deploy` section: its JSON path and what is wrong.
struct Bad {
    path: String,
    message: String,
}

impl Bad {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

fn require(ok: bool, path: impl Into<String>, message: impl FnOnce() -> String) -> Result<(), Bad> {
    if ok {
        Ok(())
    } else {
        Err(Bad::at(path, message()))
    }
}

impl DeployConfig {
    fn validate(&self, manifest: &Manifest) -> Result<(), Bad> {
        validate_region_and_name(&self.region, &self.name)?;
        require(
            (1..=255).contains(&self.cluster.len()) && self.cluster.chars().all(is_name_char),
            "$.deploy.cluster",
            || {
                format!(
                    "{:?} is not an ECS cluster name (1 to 255 of A-Z a-z 0-9 - _)",
                    self.cluster
                )
            },
        )?;
        validate_server(manifest)?;
        self.validate_network()?;
        self.validate_roles_and_logs()?;
        Self::refuse_files(manifest)?;
        self.validate_secrets(manifest)?;
        self.bootstrap.validate()?;
        self.validate_services()
    }

    fn validate_network(&self) -> Result<(), Bad> {
        let network = &self.network;
        require(
            !network.subnets.is_empty(),
            "$.deploy.network.subnets",
            || "at least one subnet is needed".into(),
        )?;
        validate_ids(&network.subnets, "subnet-", "$.deploy.network.subnets")?;
        require(
            !network.security_groups.is_empty(),
            "$.deploy.network.security_groups",
            || "at least one security group is needed".into(),
        )?;
        validate_ids(
            &network.security_groups,
            "sg-",
            "$.deploy.network.security_groups",
        )?;
        Ok(())
    }

    fn validate_roles_and_logs(&self) -> Result<(), Bad> {
        let role_ok = |arn: &str| {
            arn_parts(arn, "iam").is_some_and(|(region, resource)| {
                region.is_empty()
                    && resource
                        .strip_prefix("role/")
                        .is_some_and(|name| !name.is_empty())
            })
        };
        require(
            role_ok(&self.roles.execution_role_arn),
            "$.deploy.roles.execution_role_arn",
            || {
                format!(
                    "{:?} is not an IAM role ARN like \"arn:aws:iam::123456789012:role/fjord-execution\"",
                    self.roles.execution_role_arn
                )
            },
        )?;
        if let Some(task_role) = &self.roles.task_role_arn {
            require(role_ok(task_role), "$.deploy.roles.task_role_arn", || {
                format!("{task_role:?} is not an IAM role ARN")
            })?;
        }
        let group = &self.logs.group;
        require(
            (1..=512).contains(&group.len())
                && group.chars().all(|c| is_name_char(c) || "/.#".contains(c)),
            "$.deploy.logs.group",
            || format!("{group:?} is not a log group name (1 to 512 of A-Z a-z 0-9 _ - / . #)"),
        )?;
        if let Some(days) = self.logs.retention_days {
            const ALLOWED: [i32; 22] = [
                1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192,
                2557, 2922, 3288, 3653,
            ];
            require(
                ALLOWED.contains(&days),
                "$.deploy.logs.retention_days",
                || format!("{days} is not a CloudWatch Logs retention; one of {ALLOWED:?}"),
            )?;
        }
        Ok(())
    }

    fn validate_secrets(&self, manifest: &Manifest) -> Result<(), Bad> {
        for (env, arn) in &self.secrets {
            let path = format!("$.deploy.secrets.{env}");
            let env_ok = !env.is_empty()
                && !env.starts_with(|c: char| c.is_ascii_digit())
                && env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            require(env_ok, &path, || {
                format!("{env:?} is not an environment variable name")
            })?;
            require(!RESERVED_ENV.contains(&env.as_str()), &path, || {
                format!("{env} is set by fjord-deploy itself")
            })?;
            let arn_ok = arn_parts(arn, "secretsmanager").is_some_and(|(region, resource)| {
                !region.is_empty()
                    && resource
                        .strip_prefix("secret:")
                        .is_some_and(|n| !n.is_empty())
            }) || arn_parts(arn, "ssm").is_some_and(|(region, resource)| {
                !region.is_empty()
                    && resource
                        .strip_prefix("parameter/")
                        .is_some_and(|n| !n.is_empty())
            });
            require(arn_ok, &path, || {
                "must be the ARN of a Secrets Manager secret (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME) or an SSM parameter (arn:aws:ssm:REGION:ACCOUNT:parameter/NAME); secrets never go in the manifest".into()
            })?;
        }
        for (i, key) in self.kms_key_arns.iter().enumerate() {
            let key_ok = arn_parts(key, "kms").is_some_and(|(region, resource)| {
                !region.is_empty()
                    && resource
                        .strip_prefix("key/")
                        .is_some_and(|id| !id.is_empty())
            });
            require(key_ok, format!("$.deploy.kms_key_arns[{i}]"), || {
                format!("{key:?} is not a KMS key ARN like \"arn:aws:kms:REGION:ACCOUNT:key/ID\"")
            })?;
        }
        let named = manifest.secrets();
        for secret in &named {
            let env = secret.secret.env_name();
            require(self.secrets.contains_key(env), "$.deploy.secrets", || {
                format!(
                    "{env} (named by {}) needs the ARN of the secret that ECS injects as it",
                    secret.path
                )
            })?;
        }
        for env in self.secrets.keys() {
            // Each container gets only the secrets its process reads; a mapping that no
            // field names would reach no process.
            require(
                named.iter().any(|s| s.secret.env_name() == env),
                format!("$.deploy.secrets.{env}"),
                || {
                    format!(
                        "no field of the manifest names {env}; secrets are mapped for the *_env fields that name them ({})",
                        if named.is_empty() {
                            "this manifest has none".to_owned()
                        } else {
                            named.iter().map(|s| s.path).collect::<Vec<_>>().join(", ")
                        }
                    )
                },
            )?;
        }
        Ok(())
    }

    /// A task's file system is the read-only image: a setting that names a file cannot
    /// work there, whatever the developer's machine has.
    fn refuse_files(manifest: &Manifest) -> Result<(), Bad> {
        match manifest.file_settings().into_iter().next() {
            Some(setting) => Err(Bad::at(
                setting.path,
                format!(
                    "names the file {}, which a task cannot have (its file system is the read-only image); instead, use {}",
                    setting.file.display(),
                    setting.instead
                ),
            )),
            None => Ok(()),
        }
    }

    fn validate_services(&self) -> Result<(), Bad> {
        let server = &self.services.server;
        check_size(server.size(), "$.deploy.services.server")?;
        check_size(self.services.consumer, "$.deploy.services.consumer")?;
        let tg_ok = arn_parts(&server.target_group_arn, "elasticloadbalancing").is_some_and(
            |(region, resource)| {
                region == self.region
                    && resource
                        .strip_prefix("targetgroup/")
                        .is_some_and(|rest| rest.split('/').count() == 2)
            },
        );
        require(tg_ok, "$.deploy.services.server.target_group_arn", || {
            format!(
                "{:?} is not the ARN of a target group in {} (arn:aws:elasticloadbalancing:{}:ACCOUNT:targetgroup/NAME/ID)",
                server.target_group_arn, self.region, self.region
            )
        })?;
        require(
            server.health_check_grace_secs <= 7200,
            "$.deploy.services.server.health_check_grace_secs",
            || "must be 0 to 7200".into(),
        )?;
        let scaling = &server.autoscaling;
        let at = "$.deploy.services.server.autoscaling";
        require(
            (1..=1000).contains(&scaling.min_count),
            format!("{at}.min_count"),
            || "must be 1 to 1000".into(),
        )?;
        require(
            (scaling.min_count..=1000).contains(&scaling.max_count),
            format!("{at}.max_count"),
            || format!("must be min_count ({}) to 1000", scaling.min_count),
        )?;
        require(
            (scaling.min_count..=scaling.max_count).contains(&server.desired_count),
            "$.deploy.services.server.desired_count",
            || {
                format!(
                    "must be within the autoscaling bounds, {} to {}",
                    scaling.min_count, scaling.max_count
                )
            },
        )?;
        require(
            scaling.cpu_target > 0.0 && scaling.cpu_target <= 100.0,
            format!("{at}.cpu_target"),
            || "must be a percentage above 0, at most 100".into(),
        )?;
        require(
            scaling.connections_target >= 1.0 && scaling.connections_target.is_finite(),
            format!("{at}.connections_target"),
            || "must be at least 1 (open connections per task)".into(),
        )?;
        require(
            (0..=86_400).contains(&scaling.scale_in_cooldown_secs),
            format!("{at}.scale_in_cooldown_secs"),
            || "must be 0 to 86400".into(),
        )?;
        require(
            (0..=86_400).contains(&scaling.scale_out_cooldown_secs),
            format!("{at}.scale_out_cooldown_secs"),
            || "must be 0 to 86400".into(),
        )
    }
}

fn validate_region_and_name(region: &str, name: &str) -> Result<(), Bad> {
    require(is_region(region), "$.deploy.region", || {
        format!("{region:?} is not an AWS region like \"eu-west-1\"")
    })?;
    let name_ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    require(name_ok, "$.deploy.name", || {
        format!(
            "{name:?} must be 1 to 32 of a-z 0-9 -, starting with a letter (it prefixes repository, task and service names)"
        )
    })
}

fn validate_server(manifest: &Manifest) -> Result<(), Bad> {
    require(manifest.server.port != 0, "$.server.port", || {
        "must be a fixed port to deploy: the target group and the health check need it".into()
    })?;
    require(
        manifest
            .server
            .metrics_listener
            .as_ref()
            .is_none_or(|metrics| metrics.port != 0),
        "$.server.metrics_listener.port",
        || "must be a fixed port to deploy: scrapers need to know it".into(),
    )?;
    // Left out, the deploy writes 0.0.0.0 into the tasks' manifest (see `with_deploy`).
    let host = manifest.server.host;
    require(
        host.is_none_or(|host| host.is_unspecified()),
        "$.server.host",
        || {
            format!(
                "{} would be unreachable for the load balancer: deployed servers listen on 0.0.0.0 (or ::); leave it out for that",
                host.map(|host| host.to_string()).unwrap_or_default()
            )
        },
    )
}

fn validate_ids(ids: &[String], prefix: &str, at: &str) -> Result<(), Bad> {
    for (i, id) in ids.iter().enumerate() {
        require(is_aws_id(id, prefix), format!("{at}[{i}]"), || {
            format!("{id:?} is not an id like \"{prefix}0123456789abcdef0\"")
        })?;
    }
    Ok(())
}

impl BootstrapConfig {
    fn validate(&self) -> Result<(), Bad> {
        let at = "$.deploy.bootstrap";
        require(
            (2..=3).contains(&self.availability_zones),
            format!("{at}.availability_zones"),
            || format!("{} zones: bootstrap spans 2 or 3", self.availability_zones),
        )?;
        require(
            vpc_prefix(&self.vpc_cidr).is_some(),
            format!("{at}.vpc_cidr"),
            || {
                format!(
                    "{:?} is not an IPv4 range from /16 to /23 like \"10.0.0.0/16\" (each subnet gets a sixteenth of it, and the load balancer's need a /27 at the least)",
                    self.vpc_cidr
                )
            },
        )?;
        validate_ids(
            &self.load_balancer_subnets,
            "subnet-",
            &format!("{at}.load_balancer_subnets"),
        )?;
        if let Some(arn) = &self.certificate_arn {
            require(
                arn_parts(arn, "acm").is_some_and(|(region, resource)| {
                    !region.is_empty() && resource.starts_with("certificate/")
                }),
                format!("{at}.certificate_arn"),
                || {
                    format!(
                        "{arn:?} is not an ACM certificate ARN (arn:aws:acm:REGION:ACCOUNT:certificate/ID)"
                    )
                },
            )?;
        }
        let redis = &self.redis;
        require(
            matches!(redis.engine.as_str(), "valkey" | "redis"),
            format!("{at}.redis.engine"),
            || format!("{:?}: one of \"valkey\", \"redis\"", redis.engine),
        )?;
        require(
            redis.node_type.strip_prefix("cache.").is_some_and(|rest| {
                rest.contains('.') && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
            }),
            format!("{at}.redis.node_type"),
            || {
                format!(
                    "{:?} is not an ElastiCache node type like \"cache.t4g.micro\"",
                    redis.node_type
                )
            },
        )
    }
}

/// The network address and prefix length of an IPv4 range from /16 to /23: split in
/// sixteen, a /23 gives /27 subnets, the smallest an Application Load Balancer takes.
pub fn vpc_prefix(cidr: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (address, prefix) = cidr.split_once('/')?;
    let address: std::net::Ipv4Addr = address.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    ((16..=23).contains(&prefix) && u32::from(address) & !mask == 0).then_some((address, prefix))
}

/// Fargate's CPU and memory pairs.
fn check_size(size: TaskSize, at: &str) -> Result<(), Bad> {
    let (low, high, step) = match size.cpu {
        256 => (512, 2048, 512),
        512 => (1024, 4096, 1024),
        1024 => (2048, 8192, 1024),
        2048 => (4096, 16_384, 1024),
        4096 => (8192, 30_720, 1024),
        8192 => (16_384, 61_440, 4096),
        16_384 => (32_768, 122_880, 8192),
        cpu => {
            return Err(Bad::at(
                format!("{at}.cpu"),
                format!(
                    "{cpu} is not a Fargate CPU size: 256, 512, 1024, 2048, 4096, 8192 or 16384"
                ),
            ));
        }
    };
    // 256 CPU units take 512, 1024 or 2048 MiB: no 1536.
    let ok = (low..=high).contains(&size.memory)
        && size.memory.is_multiple_of(step)
        && !(size.cpu == 256 && size.memory == 1536);
    require(ok, format!("{at}.memory"), || {
        format!(
            "{} MiB does not fit cpu {}: Fargate allows {low} to {high} MiB in steps of {step}",
            size.memory, size.cpu
        )
    })
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn is_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts
            .first()
            .is_some_and(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        && parts[1..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
}

fn is_aws_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        (8..=17).contains(&hex.len())
            && hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

/// Splits `arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE` for `service`, checking the
/// partition and the 12-digit account; returns the region and the resource.
/// The secret a Secrets Manager `valueFrom` names: the ARN cut after the secret's name
/// (secret names have no `:`; what follows one selects a JSON key or a version). Any
/// other ARN is returned whole.
pub fn secret_arn(value_from: &str) -> &str {
    let Some(at) = value_from.find(":secret:") else {
        return value_from;
    };
    let name_at = at + ":secret:".len();
    match value_from[name_at..].find(':') {
        Some(end) => &value_from[..name_at + end],
        None => value_from,
    }
}

fn arn_parts<'a>(arn: &'a str, service: &str) -> Option<(&'a str, &'a str)> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some(svc), Some(region), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let partition_ok = partition == "aws" || partition.starts_with("aws-");
    let account_ok = account.len() == 12 && account.chars().all(|c| c.is_ascii_digit());
    (partition_ok && svc == service && account_ok && !resource.is_empty())
        .then_some((region, resource))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn example() -> Value {
        serde_json::from_str(fjord_config::EXAMPLE).unwrap()
    }

    fn error_of(value: &Value) -> String {
        Deployment::parse(&value.to_string(), Path::new("manifest.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shipped_example_deploys() {
        let deployment =
            Deployment::parse(fjord_config::EXAMPLE, Path::new("manifest.json")).unwrap();
        assert_eq!(deployment.deploy.services.server.autoscaling.max_count, 20);
        assert_eq!(deployment.deploy.secrets.len(), 2);
        let runtime: Value = serde_json::from_str(&deployment.runtime_manifest).unwrap();
        assert!(runtime.get("deploy").is_none() && runtime.get("$schema").is_none());
        let parsed = Manifest::parse(&deployment.runtime_manifest).unwrap();
        // Access control is off in the example: the runtime alone would listen on loopback,
        // out of the load balancer's reach; the deploy binds every interface, on purpose.
        assert!(matches!(parsed.auth, fjord_config::AuthConfig::Disabled));
        assert!(
            Manifest::parse(fjord_config::EXAMPLE)
                .unwrap()
                .server_host()
                .is_loopback()
        );
        assert!(parsed.server_host().is_unspecified());
        let mut value = example();
        value["server"]["host"] = "::".into();
        let kept = Deployment::parse(&value.to_string(), Path::new("m.json")).unwrap();
        let runtime: Value = serde_json::from_str(&kept.runtime_manifest).unwrap();
        assert_eq!(runtime["server"]["host"], "::");
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let mut value = example();
        let deploy = &mut value["deploy"];
        for field in ["name", "architecture"] {
            deploy.as_object_mut().unwrap().remove(field);
        }
        let server = deploy["services"]["server"].as_object_mut().unwrap();
        server.remove("desired_count");
        server.remove("health_check_grace_secs");
        let deployment = Deployment::parse(&value.to_string(), Path::new("m.json")).unwrap();
        assert_eq!(deployment.deploy.name, "fjord");
        assert_eq!(deployment.deploy.architecture, Architecture::X86_64);
        assert_eq!(deployment.deploy.services.server.desired_count, 2);
        assert_eq!(
            deployment.deploy.services.server.health_check_grace_secs,
            60
        );
    }

    #[test]
    fn every_bad_field_names_its_path() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "$.deploy: missing",
                Box::new(|v| drop(v.as_object_mut().unwrap().remove("deploy"))),
            ),
            (
                "$.deploy.colour: unknown field `colour`",
                Box::new(|v| v["deploy"]["colour"] = json!("blue")),
            ),
            (
                "$.deploy: missing field `cluster`",
                Box::new(|v| drop(v["deploy"].as_object_mut().unwrap().remove("cluster"))),
            ),
            (
                "$.deploy.region:",
                Box::new(|v| v["deploy"]["region"] = json!("Europe")),
            ),
            (
                "$.deploy.cluster:",
                Box::new(|v| v["deploy"]["cluster"] = json!("my cluster")),
            ),
            (
                "$.deploy.name:",
                Box::new(|v| v["deploy"]["name"] = json!("Fjord")),
            ),
            (
                "$.deploy.architecture:",
                Box::new(|v| v["deploy"]["architecture"] = json!("riscv")),
            ),
            (
                "$.deploy.network.subnets:",
                Box::new(|v| v["deploy"]["network"]["subnets"] = json!([])),
            ),
            (
                "$.deploy.network.subnets[1]:",
                Box::new(|v| v["deploy"]["network"]["subnets"][1] = json!("subnet-XYZ")),
            ),
            (
                "$.deploy.network.security_groups[0]:",
                Box::new(|v| v["deploy"]["network"]["security_groups"][0] = json!("default")),
            ),
            (
                "$.deploy.network.assign_public_ip:",
                Box::new(|v| v["deploy"]["network"]["assign_public_ip"] = json!("yes")),
            ),
            (
                "$.deploy.roles.execution_role_arn:",
                Box::new(|v| v["deploy"]["roles"]["execution_role_arn"] = json!("fjord-execution")),
            ),
            (
                "$.deploy.roles.task_role_arn:",
                Box::new(|v| {
                    v["deploy"]["roles"]["task_role_arn"] = json!("arn:aws:iam::123:role/x")
                }),
            ),
            (
                "$.deploy.logs.group:",
                Box::new(|v| v["deploy"]["logs"]["group"] = json!("")),
            ),
            (
                "$.deploy.logs.retention_days:",
                Box::new(|v| v["deploy"]["logs"]["retention_days"] = json!(2)),
            ),
            (
                "$.deploy.secrets.FJORD_REDIS_PASSWORD: must be the ARN",
                Box::new(|v| v["deploy"]["secrets"]["FJORD_REDIS_PASSWORD"] = json!("hunter2")),
            ),
            (
                "$.deploy.secrets.FJORD_MANIFEST_JSON: FJORD_MANIFEST_JSON is set by fjord-deploy",
                Box::new(|v| {
                    v["deploy"]["secrets"]["FJORD_MANIFEST_JSON"] =
                        json!("arn:aws:ssm:eu-west-1:123456789012:parameter/x")
                }),
            ),
            (
                "$.deploy.secrets: FJORD_KAFKA_PASSWORD (named by $.kafka.security.password_env)",
                Box::new(|v| {
                    drop(
                        v["deploy"]["secrets"]
                            .as_object_mut()
                            .unwrap()
                            .remove("FJORD_KAFKA_PASSWORD"),
                    )
                }),
            ),
            (
                "$.deploy.secrets: FJORD_HS256_SECRET (named by $.auth.hs256_secret_env) needs the ARN",
                Box::new(|v| {
                    v["auth"] = json!({
                        "mode": "jwt", "algorithms": ["HS256"], "hs256_secret_env": "FJORD_HS256_SECRET"
                    });
                }),
            ),
            (
                "$.deploy.secrets.FJORD_EXTRA: no field of the manifest names FJORD_EXTRA; secrets are mapped for the *_env fields that name them ($.redis.password_env, $.kafka.security.password_env)",
                Box::new(|v| {
                    v["deploy"]["secrets"]["FJORD_EXTRA"] =
                        json!("arn:aws:ssm:eu-west-1:123456789012:parameter/x")
                }),
            ),
            (
                "$.kafka.security.ca_file: names the file /etc/kafka/ca.pem, which a task cannot have (its file system is the read-only image); instead, use ca_pem, the CA certificates as PEM text",
                Box::new(|v| v["kafka"]["security"]["ca_file"] = json!("/etc/kafka/ca.pem")),
            ),
            (
                "$.kafka.security.key_file: names the file k.pem, which a task cannot have (its file system is the read-only image); instead, use key_pem_env, the variable that holds the private key as PEM text",
                Box::new(|v| {
                    v["kafka"]["security"] =
                        json!({"protocol": "ssl", "cert_pem": CERT, "key_file": "k.pem"});
                    drop(
                        v["deploy"]["secrets"]
                            .as_object_mut()
                            .unwrap()
                            .remove("FJORD_KAFKA_PASSWORD"),
                    );
                }),
            ),
            (
                "$.auth.keys[0].pem_file: names the file keys/public.pem, which a task cannot have (its file system is the read-only image); instead, use pem, the public key as PEM text",
                Box::new(|v| {
                    v["auth"] = json!({
                        "mode": "jwt", "algorithms": ["EdDSA"], "keys": [{"pem_file": "keys/public.pem"}]
                    });
                }),
            ),
            (
                "$.deploy.services.server.cpu: 300 is not a Fargate CPU size",
                Box::new(|v| v["deploy"]["services"]["server"]["cpu"] = json!(300)),
            ),
            (
                "$.deploy.services.server.cpu: invalid type",
                Box::new(|v| v["deploy"]["services"]["server"]["cpu"] = json!("1024")),
            ),
            (
                "$.deploy.services.server.memory: 100000 MiB does not fit cpu 1024",
                Box::new(|v| v["deploy"]["services"]["server"]["memory"] = json!(100_000)),
            ),
            (
                "$.deploy.services.consumer.memory:",
                Box::new(|v| {
                    v["deploy"]["services"]["consumer"] = json!({ "cpu": 256, "memory": 1536 });
                }),
            ),
            (
                "$.deploy.services.consumer.members: unknown field `members`",
                Box::new(|v| v["deploy"]["services"]["consumer"]["members"] = json!(3)),
            ),
            (
                "$.deploy.services.server.target_group_arn:",
                Box::new(|v| {
                    v["deploy"]["services"]["server"]["target_group_arn"] = json!(
                        "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/x/0123"
                    );
                }),
            ),
            (
                "$.deploy.services.server.desired_count:",
                Box::new(|v| v["deploy"]["services"]["server"]["desired_count"] = json!(50)),
            ),
            (
                "$.deploy.services.server.desired_count: invalid value: integer `-1`",
                Box::new(|v| v["deploy"]["services"]["server"]["desired_count"] = json!(-1)),
            ),
            (
                "$.deploy.services.server.health_check_grace_secs:",
                Box::new(|v| {
                    v["deploy"]["services"]["server"]["health_check_grace_secs"] = json!(9000)
                }),
            ),
            (
                "$.deploy.services.server.autoscaling.min_count:",
                Box::new(|v| {
                    v["deploy"]["services"]["server"]["autoscaling"]["min_count"] = json!(0)
                }),
            ),
            (
                "$.deploy.services.server.autoscaling.max_count:",
                Box::new(|v| {
                    v["deploy"]["services"]["server"]["autoscaling"]["max_count"] = json!(1)
                }),
            ),
            (
                "$.deploy.services.server.autoscaling.cpu_target:",
                Box::new(|v| {
                    v["deploy"]["services"]["server"]["autoscaling"]["cpu_target"] = json!(0)
                }),
            ),
            (
                "$.deploy.services.server.autoscaling.connections_target:",
                Box::new(|v| {
                    v["deploy"]["services"]["server"]["autoscaling"]["connections_target"] =
                        json!(0.5)
                }),
            ),
            (
                "$.deploy.services.server.autoscaling.scale_in_cooldown_secs:",
                Box::new(|v| {
                    v["deploy"]["services"]["server"]["autoscaling"]["scale_in_cooldown_secs"] =
                        json!(-5)
                }),
            ),
            (
                "$.server.port: must be a fixed port",
                Box::new(|v| v["server"]["port"] = json!(0)),
            ),
            (
                "$.server.metrics_listener.port: must be a fixed port",
                Box::new(|v| v["server"]["metrics_listener"]["port"] = json!(0)),
            ),
            (
                "$.redis.url",
                Box::new(|v| v["redis"]["url"] = json!("redis://user:pw@host:6379")),
            ),
        ];
        for (expected, mutate) in cases {
            let mut value = example();
            mutate(&mut value);
            let error = error_of(&value);
            assert!(
                error.starts_with(&format!("manifest.json: {expected}")),
                "expected {expected:?}, got {error:?}"
            );
        }
    }

    /// The example as a new user has it before bootstrap.
    fn before_bootstrap() -> Value {
        let mut value = example();
        let deploy = value["deploy"].as_object_mut().unwrap();
        for field in ["cluster", "network", "roles", "logs"] {
            deploy.remove(field);
        }
        deploy["services"]["server"]
            .as_object_mut()
            .unwrap()
            .remove("target_group_arn");
        value
    }

    #[test]
    fn bootstrap_reads_a_manifest_a_deploy_cannot_yet() {
        let text = before_bootstrap().to_string();
        let blueprint = Blueprint::parse(&text, Path::new("m.json")).unwrap();
        let deploy = &blueprint.deploy;
        assert_eq!(deploy.cluster_name(), "fjord");
        assert_eq!(deploy.log_group(), "/ecs/fjord");
        assert_eq!(deploy.target_group_arn(), None);
        assert_eq!(deploy.bootstrap.nat_gateways, NatGateways::One);
        assert!(deploy.bootstrap.redis.create);
        let error = Deployment::parse(&text, Path::new("m.json"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("missing field `target_group_arn`"),
            "{error}"
        );
        // The complete example reads for bootstrap too: it names every part.
        let full = Blueprint::parse(fjord_config::EXAMPLE, Path::new("m.json")).unwrap();
        assert_eq!(full.deploy.network.subnets.len(), 2);
    }

    /// The pre-flight never shows a secret pasted where a variable name, an ARN or an object
    /// belongs, nor the password of a URL: the runtime sections are checked by the shared
    /// parser, and serde's messages about the deploy section lose the values they quote.
    #[test]
    fn the_preflight_never_echoes_a_secret() {
        const SECRET: &str = "Hunter2-Zq8-pasted-secret";
        type Edit = Box<dyn Fn(&mut Value)>;
        let edits: Vec<Edit> = vec![
            Box::new(|v| v["kafka"]["security"]["password_env"] = json!(SECRET)),
            Box::new(|v| v["kafka"]["security"] = json!(SECRET)),
            Box::new(|v| v["redis"]["url"] = json!(format!("REDISS://u:{SECRET}@h:6379"))),
            Box::new(|v| v["redis"]["password_env"] = json!(SECRET)),
            Box::new(|v| v["auth"] = json!(SECRET)),
            Box::new(|v| {
                v["auth"] = json!({"mode": "jwt", "algorithms": ["RS256"],
                    "jwks_url": format!("https://u:{SECRET}@idp.example.com/jwks.json")})
            }),
            Box::new(|v| v["deploy"]["secrets"]["FJORD_KAFKA_PASSWORD"] = json!(SECRET)),
            Box::new(|v| v["deploy"]["secrets"] = json!(SECRET)),
            Box::new(|v| v["deploy"]["services"]["server"] = json!(SECRET)),
            Box::new(|v| v["deploy"]["architecture"] = json!(SECRET)),
            Box::new(|v| v["deploy"] = json!(SECRET)),
        ];
        for edit in edits {
            let mut value = example();
            edit(&mut value);
            let error = Deployment::parse(&value.to_string(), Path::new("manifest.json"))
                .expect_err("refused");
            for shown in [error.to_string(), format!("{error:?}")] {
                assert!(!shown.contains(SECRET), "{shown}");
            }
        }
    }

    #[test]
    fn bad_bootstrap_settings_name_their_path() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "$.deploy.bootstrap.availability_zones: 4 zones",
                Box::new(|v| v["deploy"]["bootstrap"]["availability_zones"] = json!(4)),
            ),
            (
                "$.deploy.bootstrap.vpc_cidr:",
                Box::new(|v| v["deploy"]["bootstrap"]["vpc_cidr"] = json!("10.0.0.0/8")),
            ),
            (
                "$.deploy.bootstrap.vpc_cidr:",
                Box::new(|v| v["deploy"]["bootstrap"]["vpc_cidr"] = json!("10.0.0.1/16")),
            ),
            (
                "$.deploy.bootstrap.vpc_cidr: \"10.0.0.0/24\" is not an IPv4 range from /16 to /23",
                Box::new(|v| v["deploy"]["bootstrap"]["vpc_cidr"] = json!("10.0.0.0/24")),
            ),
            (
                "$.deploy.bootstrap.nat_gateways: unknown variant, expected `one` or `per_zone`",
                Box::new(|v| v["deploy"]["bootstrap"]["nat_gateways"] = json!("two")),
            ),
            (
                "$.deploy.bootstrap.certificate_arn:",
                Box::new(|v| v["deploy"]["bootstrap"]["certificate_arn"] = json!("my-cert")),
            ),
            (
                "$.deploy.bootstrap.load_balancer_subnets[0]:",
                Box::new(|v| v["deploy"]["bootstrap"]["load_balancer_subnets"] = json!(["x"])),
            ),
            (
                "$.deploy.bootstrap.redis.engine:",
                Box::new(|v| v["deploy"]["bootstrap"]["redis"]["engine"] = json!("memcached")),
            ),
            (
                "$.deploy.bootstrap.redis.node_type:",
                Box::new(|v| v["deploy"]["bootstrap"]["redis"]["node_type"] = json!("t4g.micro")),
            ),
            (
                "$.deploy.bootstrap.colour: unknown field `colour`",
                Box::new(|v| v["deploy"]["bootstrap"]["colour"] = json!("blue")),
            ),
            (
                "$.deploy.name: \"a-name-of-twenty-six-chars\" is longer than the 25",
                Box::new(|v| v["deploy"]["name"] = json!("a-name-of-twenty-six-chars")),
            ),
            (
                "$.deploy.network.security_groups: security groups belong to a VPC",
                Box::new(|v| {
                    v["deploy"]["network"] = json!({ "security_groups": ["sg-0123456789abcdef0"] });
                }),
            ),
        ];
        for (expected, mutate) in cases {
            let mut value = before_bootstrap();
            mutate(&mut value);
            let error = Blueprint::parse(&value.to_string(), Path::new("manifest.json"))
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with(&format!("manifest.json: {expected}")),
                "expected {expected:?}, got {error:?}"
            );
        }
        // A deploy checks the section too.
        let mut value = example();
        value["deploy"]["bootstrap"]["availability_zones"] = json!(1);
        assert!(
            error_of(&value).starts_with("manifest.json: $.deploy.bootstrap.availability_zones")
        );
    }

    #[test]
    fn unreadable_file_is_named() {
        let error = Deployment::load(Path::new("/nonexistent/manifest.json")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot read manifest /nonexistent/manifest.json"),
            "{error}"
        );
    }
}
