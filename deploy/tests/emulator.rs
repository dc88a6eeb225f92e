//! `fjord-deploy` run as a user runs it, against the stand-ins that `ci/deploy-services.sh`
//! starts: a moto server for the AWS control planes (reset before each test) and a
//! distribution registry for the image pushes. Every assertion reads the emulator's or
//! the registry's state through their APIs.
#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly")]
#![allow(
    clippy::print_stdout,
    reason = "the tool's output, shown when a test fails"
)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_applicationautoscaling::types::{
    ScalableDimension, ScalableTarget, ScalingPolicy, ServiceNamespace,
};
use aws_sdk_cloudwatchlogs::types::LogGroup;
use aws_sdk_ecs::config::Credentials;
use aws_sdk_ecs::types::TaskDefinitionField;
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, LoadBalancerAttribute, ProtocolEnum, RuleCondition,
    TargetGroupAttribute, TargetTypeEnum,
};
use fjord_deploy::archive::{Image, sha256};
use fjord_deploy::config::Architecture;
use serde_json::{Value, json};
use tokio::sync::Mutex;

const REGION: &str = "us-east-1";
/// One test at a time: each resets the emulator.
static EMULATOR: Mutex<()> = Mutex::const_new(());

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run ci/test-deploy.sh, or source $FJORD_CI_STATE/deploy-env after ci/deploy-services.sh up")
    })
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{nanos:08x}")
}

// ------------------------------------------------------------------------- image archives

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1);
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// A docker archive like `dockerTools.buildLayeredImage` writes: `manifest.json`, the
/// config, one `layer.tar` per layer; gzipped when `gzip`.
fn write_archive(path: &Path, tag: &str, layers: &[&[u8]], architecture: &str, gzip: bool) {
    let layers: Vec<Vec<u8>> = layers
        .iter()
        .map(|content| tar_of(&[("hello.txt", content)]))
        .collect();
    let diff_ids: Vec<String> = layers.iter().map(|layer| sha256(layer)).collect();
    let config = json!({
        "architecture": architecture,
        "os": "linux",
        "config": { "Entrypoint": ["/bin/fjord-server"], "User": "1000:1000", "Labels": { "org.opencontainers.image.revision": "0123abc" } },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    })
    .to_string();
    let config_name = format!(
        "{}.json",
        sha256(config.as_bytes()).trim_start_matches("sha256:")
    );
    let layer_names: Vec<String> = diff_ids
        .iter()
        .map(|id| format!("{}/layer.tar", id.trim_start_matches("sha256:")))
        .collect();
    let manifest =
        json!([{ "Config": config_name, "RepoTags": [tag], "Layers": layer_names }]).to_string();
    let mut files: Vec<(&str, &[u8])> = vec![
        ("manifest.json", manifest.as_bytes()),
        (&config_name, config.as_bytes()),
    ];
    files.extend(
        layer_names
            .iter()
            .map(String::as_str)
            .zip(layers.iter().map(Vec::as_slice)),
    );
    let tar = tar_of(&files);
    let bytes = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&tar).unwrap();
        encoder.finish().unwrap()
    } else {
        tar
    };
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn archives_give_stable_digests() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("server.tar.gz");
    let plain = dir.path().join("server.tar");
    write_archive(
        &gz,
        "fjord-server:0123abc",
        &[b"base", b"app"],
        "amd64",
        true,
    );
    write_archive(
        &plain,
        "fjord-server:0123abc",
        &[b"base", b"app"],
        "amd64",
        false,
    );
    let a = Image::read(&gz, Architecture::X86_64).unwrap();
    let b = Image::read(&plain, Architecture::X86_64).unwrap();
    assert_eq!(
        a.manifest.digest, b.manifest.digest,
        "same content, same digest"
    );
    assert_eq!(
        (a.tag.as_str(), a.revision.as_deref(), a.layers.len()),
        ("0123abc", Some("0123abc"), 2)
    );
    let manifest: Value = serde_json::from_slice(&a.manifest.data).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(manifest["layers"][1]["digest"], a.layers[1].digest.as_str());
    assert_eq!(manifest["config"]["digest"], a.config.digest.as_str());

    let error = Image::read(&gz, Architecture::Arm64)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("is built for amd64, but $.deploy.architecture asks for arm64"),
        "{error}"
    );
    let bogus = dir.path().join("bogus.tar");
    std::fs::write(&bogus, tar_of(&[("hello.txt", b"hi")])).unwrap();
    let error = Image::read(&bogus, Architecture::X86_64)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with(&format!(
            "image archive {}: has no manifest.json",
            bogus.display()
        )),
        "{error}"
    );
}

// ------------------------------------------------------------------------- the emulator

/// The AWS side of a test: moto freshly reset, with a VPC, two subnets, a security
/// group, an ALB with an `ip` target group, and an ECS cluster.
struct Aws {
    /// The proxy's endpoint, which the tool talks to.
    endpoint: String,
    /// Between the tool and moto.
    proxy: MotoProxy,
    /// The SDK's configuration for moto itself, for clients the struct has none of.
    config: SdkConfig,
    ecs: aws_sdk_ecs::Client,
    ecr: aws_sdk_ecr::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    scaling: aws_sdk_applicationautoscaling::Client,
    logs: aws_sdk_cloudwatchlogs::Client,
    subnets: Vec<String>,
    security_group: String,
    target_group_arn: String,
    load_balancer_arn: String,
    dns_name: String,
}

/// Resets moto; returns its endpoint and an SDK config that talks to it.
async fn reset_moto() -> (String, SdkConfig) {
    let endpoint = required_env("FJORD_TEST_AWS_ENDPOINT");
    reqwest::Client::new()
        .post(format!("{endpoint}/moto-api/reset"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(&endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .load()
        .await;
    (endpoint, config)
}

/// Creates a target group for IP targets, in `vpc`, that probes `/readyz`: its ARN.
async fn ip_target_group(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    name: &str,
    vpc: &str,
) -> String {
    let created = elb
        .create_target_group()
        .name(name)
        .protocol(ProtocolEnum::Http)
        .port(8080)
        .vpc_id(vpc)
        .target_type(TargetTypeEnum::Ip)
        .health_check_path("/readyz")
        .send()
        .await
        .unwrap();
    created.target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_owned()
}

/// An EC2 Query API call to moto (the deploy tool has no EC2 client); returns the text of
/// the first `<field>` in the answer.
async fn ec2(
    http: &reqwest::Client,
    endpoint: &str,
    params: &[(&str, &str)],
    field: &str,
) -> String {
    let body: Vec<String> = params
        .iter()
        .chain(&[("Version", "2016-11-15")])
        .map(|(k, v)| format!("{k}={}", v.replace('/', "%2F")))
        .collect();
    let answer = http
        .post(format!("{endpoint}/"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header(
            "Authorization",
            format!("AWS4-HMAC-SHA256 Credential=testing/20250101/{REGION}/ec2/aws4_request, SignedHeaders=host, Signature=0"),
        )
        .body(body.join("&"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open = format!("<{field}>");
    let start = answer
        .find(&open)
        .unwrap_or_else(|| panic!("no {field} in {answer}"))
        + open.len();
    let end = answer[start..].find('<').unwrap() + start;
    answer[start..end].to_owned()
}

impl Aws {
    async fn fresh(cluster: &str) -> Self {
        let (endpoint, config) = reset_moto().await;
        let http = reqwest::Client::new();
        let ecs = aws_sdk_ecs::Client::new(&config);
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(&config);

        let vpc = ec2(
            &http,
            &endpoint,
            &[("Action", "CreateVpc"), ("CidrBlock", "10.0.0.0/16")],
            "vpcId",
        )
        .await;
        let mut subnets = Vec::new();
        for (cidr, zone) in [("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b")] {
            let params = [
                ("Action", "CreateSubnet"),
                ("VpcId", vpc.as_str()),
                ("CidrBlock", cidr),
                ("AvailabilityZone", zone),
            ];
            subnets.push(ec2(&http, &endpoint, &params, "subnetId").await);
        }
        let params = [
            ("Action", "CreateSecurityGroup"),
            ("GroupName", "fjord"),
            ("GroupDescription", "fjord"),
            ("VpcId", vpc.as_str()),
        ];
        let security_group = ec2(&http, &endpoint, &params, "groupId").await;

        let balancer = elb
            .create_load_balancer()
            .name("fjord")
            .set_subnets(Some(subnets.clone()))
            .security_groups(&security_group)
            .send()
            .await
            .unwrap();
        let balancer = &balancer.load_balancers()[0];
        let load_balancer_arn = balancer.load_balancer_arn().unwrap().to_owned();
        let dns_name = balancer.dns_name().unwrap().to_owned();
        let target_group_arn = ip_target_group(&elb, "fjord-server", &vpc).await;
        elb.create_listener()
            .load_balancer_arn(&load_balancer_arn)
            .protocol(ProtocolEnum::Http)
            .port(80)
            .default_actions(
                Action::builder()
                    .r#type(ActionTypeEnum::Forward)
                    .target_group_arn(&target_group_arn)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let proxy = MotoProxy::start(&endpoint).await;
        let aws = Self {
            endpoint: proxy.endpoint.clone(),
            proxy,
            config: config.clone(),
            ecr: aws_sdk_ecr::Client::new(&config),
            scaling: aws_sdk_applicationautoscaling::Client::new(&config),
            logs: aws_sdk_cloudwatchlogs::Client::new(&config),
            ecs,
            elb,
            subnets,
            security_group,
            target_group_arn,
            load_balancer_arn,
            dns_name,
        };
        aws.set_idle_timeout(60).await;
        aws.set_deregistration_delay(&aws.target_group_arn, 20)
            .await;
        aws.ecs
            .create_cluster()
            .cluster_name(cluster)
            .send()
            .await
            .unwrap();
        aws
    }

    async fn set_idle_timeout(&self, secs: u32) {
        self.elb
            .modify_load_balancer_attributes()
            .load_balancer_arn(&self.load_balancer_arn)
            .attributes(
                LoadBalancerAttribute::builder()
                    .key("idle_timeout.timeout_seconds")
                    .value(secs.to_string())
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }

    async fn set_deregistration_delay(&self, target_group_arn: &str, secs: u32) {
        self.elb
            .modify_target_group_attributes()
            .target_group_arn(target_group_arn)
            .attributes(
                TargetGroupAttribute::builder()
                    .key("deregistration_delay.timeout_seconds")
                    .value(secs.to_string())
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }

    async fn set_health_check_path(&self, path: &str) {
        self.elb
            .modify_target_group()
            .target_group_arn(&self.target_group_arn)
            .health_check_path(path)
            .send()
            .await
            .unwrap();
    }

    /// The secrets of the latest task definition of `family`, by name.
    async fn secret_names(&self, family: &str) -> Vec<String> {
        let described = self
            .ecs
            .describe_task_definition()
            .task_definition(family)
            .send()
            .await
            .unwrap();
        let container = &described.task_definition().unwrap().container_definitions()[0];
        let mut names: Vec<String> = container
            .secrets()
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        names.sort();
        names
    }

    async fn repositories(&self) -> Vec<String> {
        let answer = self.ecr.describe_repositories().send().await.unwrap();
        answer
            .repositories()
            .iter()
            .filter_map(|r| r.repository_name())
            .map(str::to_owned)
            .collect()
    }

    /// Every registered revision of `family`.
    async fn revisions(&self, family: &str) -> usize {
        let answer = self
            .ecs
            .list_task_definitions()
            .family_prefix(family)
            .send()
            .await
            .unwrap();
        answer.task_definition_arns().len()
    }

    async fn service(&self, cluster: &str, name: &str) -> Option<aws_sdk_ecs::types::Service> {
        let answer = self
            .ecs
            .describe_services()
            .cluster(cluster)
            .services(name)
            .send()
            .await
            .unwrap();
        answer
            .services()
            .iter()
            .find(|s| s.status() == Some("ACTIVE"))
            .cloned()
    }

    /// The scalable targets of the ECS service `resource` (`service/{cluster}/{name}`).
    async fn scalable_targets(&self, resource: &str) -> Vec<ScalableTarget> {
        let answer = self
            .scaling
            .describe_scalable_targets()
            .service_namespace(ServiceNamespace::Ecs)
            .resource_ids(resource)
            .send()
            .await
            .unwrap();
        answer.scalable_targets().to_vec()
    }

    /// The scaling policies of the ECS service `resource` (`service/{cluster}/{name}`).
    async fn scaling_policies(&self, resource: &str) -> Vec<ScalingPolicy> {
        let answer = self
            .scaling
            .describe_scaling_policies()
            .service_namespace(ServiceNamespace::Ecs)
            .resource_id(resource)
            .send()
            .await
            .unwrap();
        answer.scaling_policies().to_vec()
    }

    /// The log groups whose names start with `prefix`.
    async fn log_groups(&self, prefix: &str) -> Vec<LogGroup> {
        let answer = self
            .logs
            .describe_log_groups()
            .log_group_name_prefix(prefix)
            .send()
            .await
            .unwrap();
        answer.log_groups().to_vec()
    }
}

// ------------------------------------------------------------------------- a deploy

/// A manifest (the shipped example, pointed at the emulator's resources) and two image
/// archives in a temporary directory.
struct Fixture {
    dir: tempfile::TempDir,
    name: String,
    cluster: String,
    manifest: Value,
}

impl Fixture {
    async fn new(prefix: &str) -> (Self, Aws) {
        let name = unique(prefix);
        let cluster = format!("{name}-cluster");
        let aws = Aws::fresh(&cluster).await;
        let mut manifest: Value = serde_json::from_str(fjord_config::EXAMPLE).unwrap();
        let deploy = &mut manifest["deploy"];
        deploy["region"] = json!(REGION);
        deploy["cluster"] = json!(cluster);
        deploy["name"] = json!(name);
        deploy["network"]["subnets"] = json!(aws.subnets);
        deploy["network"]["security_groups"] = json!([aws.security_group]);
        deploy["logs"]["group"] = json!(format!("/ecs/{name}"));
        deploy["services"]["server"]["target_group_arn"] = json!(aws.target_group_arn);
        let fixture = Self {
            dir: tempfile::tempdir().unwrap(),
            name,
            cluster,
            manifest,
        };
        fixture.write_manifest();
        fixture.write_images("v1");
        (fixture, aws)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn write_manifest(&self) {
        self.write_edited(|_| ());
    }

    /// Writes the manifest with `edit` applied (the fixture keeps the original).
    fn write_edited(&self, edit: impl FnOnce(&mut Value)) {
        let mut manifest = self.manifest.clone();
        edit(&mut manifest);
        std::fs::write(
            self.path("manifest.json"),
            serde_json::to_string_pretty(&manifest).unwrap(),
        )
        .unwrap();
    }

    /// Both images: a shared base layer, and an app layer that `version` changes.
    fn write_images(&self, version: &str) {
        for role in ["server", "consumer"] {
            let app = format!("{} {role} {version}", self.name);
            let tag = format!("fjord-{role}:{version}");
            write_archive(
                &self.path(&format!("{role}.tar.gz")),
                &tag,
                &[b"base", app.as_bytes()],
                "amd64",
                true,
            );
        }
    }

    fn server(&self) -> String {
        format!("{}-server", self.name)
    }

    fn consumer(&self) -> String {
        format!("{}-consumer-fjord-superEats", self.name)
    }

    /// Runs `fjord-deploy manifest.json` with `args`, against the emulator and the registry.
    fn deploy(&self, aws: &Aws, args: &[&str]) -> Run {
        self.deploy_to(aws, &required_env("FJORD_TEST_REGISTRY"), args)
    }

    fn deploy_to(&self, aws: &Aws, registry: &str, args: &[&str]) -> Run {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fjord-deploy"));
        command
            .arg(self.path("manifest.json"))
            .arg("--server-image")
            .arg(self.path("server.tar.gz"))
            .arg("--consumer-image")
            .arg(self.path("consumer.tar.gz"))
            .args(["--registry-url", registry]);
        Self::run(command, aws, args)
    }

    /// Runs `fjord-deploy destroy manifest.json` with `args`, against the emulator.
    fn destroy(&self, aws: &Aws, args: &[&str]) -> Run {
        self.command(aws, "destroy", args)
    }

    /// Both services' two tasks come up: moto counts them running once a service's
    /// desired count is updated.
    async fn tasks_up(&self, aws: &Aws) {
        for service in [self.server(), self.consumer()] {
            aws.ecs
                .update_service()
                .cluster(&self.cluster)
                .service(service)
                .desired_count(2)
                .send()
                .await
                .unwrap();
        }
    }

    /// Runs `fjord-deploy SUBCOMMAND manifest.json` with `args`, against the emulator.
    fn command(&self, aws: &Aws, subcommand: &str, args: &[&str]) -> Run {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fjord-deploy"));
        command.arg(subcommand).arg(self.path("manifest.json"));
        Self::run(command, aws, args)
    }

    fn run(mut command: Command, aws: &Aws, args: &[&str]) -> Run {
        let output = command
            .args(["--endpoint-url", &aws.endpoint])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("FJORD_REGISTRY_URL")
            .output()
            .unwrap();
        Run::from(output)
    }
}

/// Fails unless every AWS call the tool made through the proxy since the last look is
/// granted by what `fjord-deploy policy --for COMMAND` prints for the fixture's manifest.
fn granted(fixture: &Fixture, aws: &Aws, command: &str) {
    let calls = aws.proxy.take_calls();
    assert!(!calls.is_empty(), "no AWS call recorded for {command}");
    let output = Command::new(env!("CARGO_BIN_EXE_fjord-deploy"))
        .arg("policy")
        .arg(fixture.path("manifest.json"))
        .args(["--for", command])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let policy: Value = serde_json::from_slice(&output.stdout).unwrap();
    let actions: std::collections::BTreeSet<String> = fjord_deploy::policy::actions(&policy)
        .into_iter()
        .map(|a| a.to_ascii_lowercase())
        .collect();
    let missing: std::collections::BTreeSet<&String> = calls
        .iter()
        .filter(|call| !actions.contains(&call.to_ascii_lowercase()))
        .collect();
    assert!(
        missing.is_empty(),
        "{command} called {missing:?}, which `fjord-deploy policy --for {command}` does not grant"
    );
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        let run = Self {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        println!(
            "--- fjord-deploy stdout\n{}--- stderr\n{}",
            run.stdout, run.stderr
        );
        run
    }
}

impl Run {
    fn succeeded(self) -> Self {
        assert!(self.ok, "fjord-deploy failed:\n{}", self.stderr);
        self
    }

    fn failed(self) -> Self {
        assert!(
            !self.ok,
            "fjord-deploy should have failed:\n{}",
            self.stdout
        );
        self
    }

    fn says(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text) || self.stderr.contains(text),
            "expected {text:?} in\n{}\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// The registry's answer to `request`; `None` where it has no such thing (404).
async fn registry_answer(request: reqwest::RequestBuilder) -> Option<reqwest::Response> {
    let answer = request.send().await.unwrap();
    if answer.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    assert!(answer.status().is_success(), "{answer:?}");
    Some(answer)
}

/// The registry's digest for `repository:tag`, by its HTTP API; `None` if it has none.
async fn registry_digest(repository: &str, tag: &str) -> Option<String> {
    let registry = required_env("FJORD_TEST_REGISTRY");
    let answer = registry_answer(
        reqwest::Client::new()
            .get(format!("{registry}/v2/{repository}/manifests/{tag}"))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json"),
    )
    .await?;
    let digest = answer.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let manifest: Value = answer.json().await.unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);
    Some(digest)
}

// ------------------------------------------------------------------------- the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_deploy_then_a_second_run_changes_nothing() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("full").await;
    let (name, cluster) = (fixture.name.clone(), fixture.cluster.clone());

    let run = fixture.deploy(&aws, &["--no-wait"]).succeeded();
    run.says(&format!("ECR repository {name}/server: created"))
        .says(&format!(
            "image {name}/server: pushed 3 of 3 blobs (0 already there)"
        ))
        .says(&format!(
            "task definition {}: registered {}:1",
            fixture.server(),
            fixture.server()
        ))
        .says(&format!(
            "service {}: created with 2 tasks",
            fixture.server()
        ))
        .says(&format!(
            "service {}: created with 2 tasks",
            fixture.consumer()
        ))
        .says("autoscaling of service/")
        .says(&format!("Load balancer: {}", aws.dns_name));

    // ECR repositories and the pushed images.
    let mut repositories = aws.repositories().await;
    repositories.sort();
    assert_eq!(
        repositories,
        [format!("{name}/consumer"), format!("{name}/server")]
    );
    // Each keeps the newest 30 images, not every deploy's forever.
    for repository in &repositories {
        let policy = aws
            .ecr
            .get_lifecycle_policy()
            .repository_name(repository)
            .send()
            .await
            .unwrap();
        let policy: Value = serde_json::from_str(policy.lifecycle_policy_text().unwrap()).unwrap();
        assert_eq!(
            policy["rules"][0]["selection"],
            json!({"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 30})
        );
        assert_eq!(policy["rules"][0]["action"]["type"], "expire");
    }
    let server_digest = registry_digest(&format!("{name}/server"), "v1")
        .await
        .expect("server image pushed");
    assert!(
        registry_digest(&format!("{name}/consumer"), "v1")
            .await
            .is_some(),
        "consumer image pushed"
    );

    // The server's task definition: pinned by digest, manifest passed in, secrets by ARN.
    let described = aws
        .ecs
        .describe_task_definition()
        .task_definition(fixture.server())
        .include(TaskDefinitionField::Tags)
        .send()
        .await
        .unwrap();
    let task = described.task_definition().unwrap();
    assert_eq!((task.cpu(), task.memory()), (Some("1024"), Some("2048")));
    let container = &task.container_definitions()[0];
    let image = container.image().unwrap();
    assert!(
        image.ends_with(&format!("/{name}/server@{server_digest}")),
        "{image} pinned by digest"
    );
    let env: std::collections::HashMap<&str, &str> = container
        .environment()
        .iter()
        .map(|kv| (kv.name().unwrap(), kv.value().unwrap()))
        .collect();
    let runtime: Value = serde_json::from_str(env["FJORD_MANIFEST_JSON"]).unwrap();
    assert!(runtime.get("deploy").is_none());
    assert_eq!(runtime["endpoints"], fixture.manifest["endpoints"]);
    assert_eq!(
        (env["FJORD_EMF_CLUSTER"], env["FJORD_EMF_SERVICE"]),
        (cluster.as_str(), fixture.server().as_str())
    );
    let secret = container
        .secrets()
        .iter()
        .find(|s| s.name() == "FJORD_REDIS_PASSWORD")
        .unwrap();
    assert_eq!(
        secret.value_from(),
        fixture.manifest["deploy"]["secrets"]["FJORD_REDIS_PASSWORD"]
            .as_str()
            .unwrap()
    );
    assert_eq!(container.stop_timeout(), Some(30));
    assert!(
        container
            .health_check()
            .unwrap()
            .command()
            .join(" ")
            .contains("/healthz")
    );
    let log_options = container.log_configuration().unwrap().options().unwrap();
    assert_eq!(log_options["awslogs-group"], format!("/ecs/{name}"));

    // Services: the server behind its target group, one consumer service per group.
    let server = aws.service(&cluster, &fixture.server()).await.unwrap();
    assert_eq!(server.desired_count(), 2);
    assert_eq!(
        server.load_balancers()[0].target_group_arn(),
        Some(aws.target_group_arn.as_str())
    );
    assert_eq!(server.task_definition(), task.task_definition_arn());
    let consumer = aws.service(&cluster, &fixture.consumer()).await.unwrap();
    assert_eq!(consumer.desired_count(), 2, "one task per group member");

    // Autoscaling on CPU and on open connections per task.
    let resource = format!("service/{cluster}/{}", fixture.server());
    let targets = aws.scalable_targets(&resource).await;
    let target = &targets[0];
    assert_eq!((target.min_capacity(), target.max_capacity()), (2, 20));
    assert_eq!(
        target.scalable_dimension(),
        &ScalableDimension::EcsServiceDesiredCount
    );
    let policies = aws.scaling_policies(&resource).await;
    let mut names: Vec<&str> = policies.iter().map(|p| p.policy_name()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            format!("{}-connections", fixture.server()),
            format!("{}-cpu", fixture.server())
        ]
    );
    assert_eq!(aws.log_groups(&format!("/ecs/{name}")).await.len(), 1);

    // The same again: nothing changes.
    let run = fixture.deploy(&aws, &["--no-wait"]).succeeded();
    run.says(&format!("ECR repository {name}/server: exists"))
        .says(&format!(
            "image {name}/server: unchanged: all 3 blobs already there"
        ))
        .says(&format!(
            "task definition {}: unchanged ({}:1)",
            fixture.server(),
            fixture.server()
        ))
        .says(&format!(
            "task definition {}: unchanged",
            fixture.consumer()
        ))
        .says(&format!("service {}: unchanged", fixture.server()))
        .says(&format!("service {}: unchanged", fixture.consumer()))
        .says(&format!("autoscaling of {resource}: unchanged"));
    assert!(
        !run.stdout.contains("registered") && !run.stdout.contains("created"),
        "{}",
        run.stdout
    );
    assert_eq!(
        (
            aws.revisions(&fixture.server()).await,
            aws.revisions(&fixture.consumer()).await
        ),
        (1, 1)
    );

    // A new server image: a dry run says what would change, and changes nothing.
    fixture.write_images("v2");
    fixture
        .deploy(&aws, &["--dry-run"])
        .succeeded()
        .says(&format!("image {name}/server: would push 2 of 3 blobs"))
        .says(&format!(
            "task definition {}: would register a new revision",
            fixture.server()
        ))
        .says("Dry run: nothing was changed.");
    assert_eq!(aws.revisions(&fixture.server()).await, 1);
    assert_eq!(registry_digest(&format!("{name}/server"), "v2").await, None);

    // Deployed for real: new revisions, services rolled, one more group member.
    fixture.write_edited(|manifest| manifest["consumer_groups"][0]["members"] = json!(3));
    fixture
        .deploy(&aws, &["--no-wait"])
        .succeeded()
        .says(&format!(
            "image {name}/server: pushed 2 of 3 blobs (1 already there)"
        ))
        .says(&format!(
            "task definition {}: registered {}:2",
            fixture.server(),
            fixture.server()
        ))
        .says(&format!(
            "service {}: updated: task definition {}:2",
            fixture.server(),
            fixture.server()
        ))
        .says("desired count 2 → 3");
    assert_eq!(aws.revisions(&fixture.server()).await, 2);
    assert_eq!(
        aws.service(&cluster, &fixture.consumer())
            .await
            .unwrap()
            .desired_count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_changes_nothing() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("dry").await;
    let name = &fixture.name;
    fixture
        .deploy(&aws, &["--dry-run"])
        .succeeded()
        .says("dry run: nothing will be changed")
        .says(&format!("ECR repository {name}/server: would create"))
        .says(&format!("image {name}/consumer: would push 3 of 3 blobs"))
        .says(&format!("log group /ecs/{name}: would create"))
        .says(&format!(
            "task definition {}: would register a new revision",
            fixture.server()
        ))
        .says(&format!(
            "service {}: would create with 2 tasks",
            fixture.consumer()
        ))
        .says("autoscaling of service/")
        .says("Dry run: nothing was changed.");
    assert!(aws.repositories().await.is_empty());
    assert_eq!(registry_digest(&format!("{name}/server"), "v1").await, None);
    assert_eq!(aws.revisions(&fixture.server()).await, 0);
    let services = aws
        .ecs
        .list_services()
        .cluster(&fixture.cluster)
        .send()
        .await
        .unwrap();
    assert!(services.service_arns().is_empty());
    let targets = aws
        .scaling
        .describe_scalable_targets()
        .service_namespace(ServiceNamespace::Ecs)
        .send()
        .await
        .unwrap();
    assert!(targets.scalable_targets().is_empty());
    assert!(aws.log_groups(&format!("/ecs/{name}")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_before_any_change() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("refuse").await;

    // A bad manifest: the path of the value, before any AWS call.
    fixture.write_edited(|manifest| manifest["deploy"]["services"]["server"]["cpu"] = json!(300));
    fixture
        .deploy(&aws, &[])
        .failed()
        .says("manifest.json: $.deploy.services.server.cpu: 300 is not a Fargate CPU size");
    fixture.write_manifest();

    // Not an image archive.
    std::fs::write(fixture.path("server.tar.gz"), b"not a tarball").unwrap();
    fixture.deploy(&aws, &[]).failed().says(&format!(
        "image archive {}",
        fixture.path("server.tar.gz").display()
    ));
    fixture.write_images("v1");

    // A cluster that does not exist.
    fixture.write_edited(|manifest| manifest["deploy"]["cluster"] = json!("no-such-cluster"));
    fixture
        .deploy(&aws, &[])
        .failed()
        .says("ECS cluster no-such-cluster: not found or not active; create the cluster first (nothing was changed)");
    fixture.write_manifest();

    // A load balancer that would cut idle streams before the heartbeat.
    aws.set_idle_timeout(10).await;
    fixture
        .deploy(&aws, &[])
        .failed()
        .says(
            "its idle timeout (10 s) must be above the heartbeat ($.server.heartbeat_secs = 15 s)",
        )
        .says("(nothing was changed)");

    assert!(aws.repositories().await.is_empty(), "nothing was created");
    assert_eq!(aws.revisions(&fixture.server()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_group_that_cannot_drain_is_refused() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("drain").await;
    let resource = format!("target group {}", aws.target_group_arn);

    // AWS's default delay: ECS would hold every stopping task five minutes.
    aws.set_deregistration_delay(&aws.target_group_arn, 300)
        .await;
    fixture
        .deploy(&aws, &[])
        .failed()
        .says(&format!(
            "{resource}: its deregistration delay is 300 s; it must be 15 to 60 s"
        ))
        .says("a longer delay only holds up every deploy wave")
        .says("Key=deregistration_delay.timeout_seconds,Value=20")
        .says("(nothing was changed)");
    aws.set_deregistration_delay(&aws.target_group_arn, 5).await;
    fixture
        .deploy(&aws, &[])
        .failed()
        .says("its deregistration delay is 5 s; it must be 15 to 60 s")
        .says("below 15 s, load balancer nodes still send new streams");
    aws.set_deregistration_delay(&aws.target_group_arn, 20)
        .await;

    // A health check on a path that does not say whether the server can stream.
    aws.set_health_check_path("/healthz").await;
    fixture.deploy(&aws, &[]).failed().says(&format!(
        "{resource}: its health check path is /healthz; it must be /readyz"
    ));
    aws.set_health_check_path("/readyz").await;

    // A target group no listener forwards to.
    let vpc = aws
        .elb
        .describe_target_groups()
        .target_group_arns(&aws.target_group_arn)
        .send()
        .await
        .unwrap()
        .target_groups()[0]
        .vpc_id()
        .unwrap()
        .to_owned();
    let unattached = ip_target_group(&aws.elb, "fjord-unattached", &vpc).await;
    aws.set_deregistration_delay(&unattached, 20).await;
    fixture.write_edited(|manifest| {
        manifest["deploy"]["services"]["server"]["target_group_arn"] = json!(unattached);
    });
    fixture
        .deploy(&aws, &[])
        .failed()
        .says(&format!(
            "target group {unattached}: no load balancer listener forwards to it"
        ))
        .says("(nothing was changed)");
    assert!(aws.repositories().await.is_empty(), "nothing was created");

    // Forwarded to by a listener rule (not the default action): good to go.
    let listeners = aws
        .elb
        .describe_listeners()
        .load_balancer_arn(&aws.load_balancer_arn)
        .send()
        .await
        .unwrap();
    aws.elb
        .create_rule()
        .listener_arn(listeners.listeners()[0].listener_arn().unwrap())
        .priority(10)
        .conditions(
            RuleCondition::builder()
                .field("path-pattern")
                .values("/v2/*")
                .build(),
        )
        .actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&unattached)
                .build(),
        )
        .send()
        .await
        .unwrap();
    fixture
        .deploy(&aws, &["--dry-run"])
        .succeeded()
        .says("Dry run: nothing was changed.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_container_gets_only_the_secrets_it_reads() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("secrets").await;
    let hs256 = json!({
        "mode": "jwt", "algorithms": ["HS256"], "hs256_secret_env": "FJORD_HS256_SECRET"
    });

    // A secret the manifest names but does not map: refused before any AWS call.
    fixture.write_edited(|manifest| manifest["auth"] = hs256.clone());
    fixture.deploy(&aws, &[]).failed().says(
        "$.deploy.secrets: FJORD_HS256_SECRET (named by $.auth.hs256_secret_env) needs the ARN",
    );
    // A file, which no task has: refused, naming the form to use instead.
    fixture.write_edited(|manifest| {
        manifest["kafka"]["security"]["ca_file"] = json!("/etc/kafka/ca.pem");
    });
    fixture
        .deploy(&aws, &[])
        .failed()
        .says(
            "$.kafka.security.ca_file: names the file /etc/kafka/ca.pem, which a task cannot have",
        )
        .says("instead, use ca_pem, the CA certificates as PEM text");
    assert!(aws.repositories().await.is_empty(), "nothing was created");

    fixture.write_edited(|manifest| {
        manifest["auth"] = hs256.clone();
        manifest["deploy"]["secrets"]["FJORD_HS256_SECRET"] =
            json!("arn:aws:secretsmanager:us-east-1:123456789012:secret:fjord/hs256-AbCdEf");
    });
    fixture.deploy(&aws, &["--no-wait"]).succeeded();
    // The server verifies tokens and reads the bus; the consumer reads Kafka and the bus.
    assert_eq!(
        aws.secret_names(&fixture.server()).await,
        ["FJORD_HS256_SECRET", "FJORD_REDIS_PASSWORD"]
    );
    assert_eq!(
        aws.secret_names(&fixture.consumer()).await,
        ["FJORD_KAFKA_PASSWORD", "FJORD_REDIS_PASSWORD"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_midway_reports_what_was_done() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("midway").await;
    let name = &fixture.name;
    // Nothing listens on port 9 of loopback: the registry refuses the push.
    let run = fixture
        .deploy_to(&aws, "http://127.0.0.1:9", &["--no-wait"])
        .failed();
    run.says(&format!("image {name}/server failed: registry 127.0.0.1:9, repository {name}/server"))
        .says(&format!("done:\n  - ECR repository {name}/server: created (its lifecycle policy keeps the newest 30 images)\n  - ECR repository {name}/consumer: created (its lifecycle policy keeps the newest 30 images)\nnot done:"))
        .says(&format!("  - image {name}/server (failed)\n  - image {name}/consumer\n  - log group /ecs/{name}"))
        .says(&format!("  - task definition {}", fixture.server()))
        .says(&format!("  - service {}", fixture.consumer()))
        .says("  - autoscaling of service/");
    assert_eq!(
        aws.repositories().await.len(),
        2,
        "the repositories were created"
    );
    assert_eq!(
        aws.revisions(&fixture.server()).await,
        0,
        "no task definition was registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_until_the_services_are_stable() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("wait").await;
    // moto never starts tasks on its own: the wait runs out, and says where each stands.
    fixture
        .deploy(&aws, &["--wait-timeout", "2", "--poll-secs", "1"])
        .failed()
        .says(&format!(
            "  … {}: ACTIVE, 0/2 running, 2 pending",
            fixture.server()
        ))
        .says(&format!(
            "services stable failed: services not stable after 2 s: {}: ACTIVE, 0/2 running",
            fixture.server()
        ))
        .says(&format!(
            "(no task of {}:1 has started, and none failed: ECS's circuit breaker never trips on tasks that do not start",
            fixture.server()
        ))
        .says("done:")
        .says(&format!(
            "  - service {}: created with 2 tasks",
            fixture.consumer()
        ))
        .says("not done:\n  - services stable (failed)");

    fixture.tasks_up(&aws).await;
    fixture
        .deploy(&aws, &["--wait-timeout", "20", "--poll-secs", "1"])
        .succeeded()
        .says("services stable: yes")
        .says(&format!("Target group: {}", aws.target_group_arn))
        .says(&format!("Load balancer: {}", aws.dns_name))
        .says(&format!(
            "Service {}: ACTIVE, 2/2 running, 0 pending, 1 deployment(s)",
            fixture.server()
        ))
        .says(&format!(
            "Service {}: ACTIVE, 2/2 running",
            fixture.consumer()
        ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_deploy_fails_with_the_stopped_tasks_reasons() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("rollback").await;
    fixture.deploy(&aws, &["--no-wait"]).succeeded();
    fixture.tasks_up(&aws).await;

    // New images; ECS's circuit breaker rolls the server back to revision 1. The counts
    // and the single deployment look settled: only the revision tells.
    fixture.write_images("v2");
    aws.proxy.roll_back(&fixture.server());
    fixture
        .deploy(&aws, &["--wait-timeout", "20", "--poll-secs", "1"])
        .failed()
        .says(&format!(
            "services stable failed: ECS service {0}: its PRIMARY deployment runs {0}:1, not {0}:2 that this deploy registered: ECS rolled the deployment back",
            fixture.server()
        ))
        .says(&format!("stopped tasks of {}:2:", fixture.server()))
        .says(&format!("stopped: {ROLLED_BACK_REASON}"))
        .says("not done:\n  - services stable (failed)");
    let server = aws
        .service(&fixture.cluster, &fixture.server())
        .await
        .unwrap();
    assert!(
        server
            .task_definition()
            .unwrap()
            .ends_with(&format!("{}:1", fixture.server()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_diff_verify_and_rollback_on_the_emulator_within_the_printed_policy() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("everyday").await;
    let (server, consumer) = (fixture.server(), fixture.consumer());
    fixture.deploy(&aws, &["--no-wait"]).succeeded();
    granted(&fixture, &aws, "deploy");
    fixture.tasks_up(&aws).await;

    let status = fixture.command(&aws, "status", &[]).succeeded();
    status
        .says(&format!("Service {server}: ACTIVE, 2/2 running, 0 pending"))
        .says(&format!(
            "(PRIMARY): task definition {server}:1, 2/2 running"
        ))
        .says(&format!("image of server ({server}:1): "))
        .says(&format!("/{}/server@sha256:", fixture.name))
        .says(&format!("Service {consumer}: ACTIVE"));
    granted(&fixture, &aws, "deploy");

    // Nothing changed: nothing to show. Then a consumer group grows and the heartbeat
    // changes: the service's count and the runtime manifest's field show, alone.
    fixture
        .command(&aws, "diff", &[])
        .succeeded()
        .says(&format!("task definition {server}:1: unchanged"))
        .says(&format!("service {consumer}: unchanged"))
        .says("No changes.");
    fixture.write_edited(|m| {
        m["consumer_groups"][0]["members"] = json!(3);
        m["server"]["heartbeat_secs"] = json!(25);
    });
    let diff = fixture.command(&aws, "diff", &[]).succeeded();
    diff.says(&format!(
        "--- service {consumer} in ECS\n+++ service {consumer} wanted"
    ))
    .says("-  \"desiredCount\": 2,\n+  \"desiredCount\": 3,")
    .says(&format!("--- task definition {server}:1 in ECS"));
    assert!(
        diff.stdout
            .lines()
            .any(|l| l.starts_with('+') && l.contains("\"heartbeat_secs\": 25")),
        "{}",
        diff.stdout
    );
    assert!(!diff.stdout.contains("No changes."), "{}", diff.stdout);
    granted(&fixture, &aws, "deploy");
    fixture.write_manifest();

    // verify: nothing the tasks need is there yet.
    let execution = fixture.manifest["deploy"]["roles"]["execution_role_arn"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = fixture.manifest["deploy"]["secrets"]["FJORD_KAFKA_PASSWORD"]
        .as_str()
        .unwrap()
        .to_owned();
    let parameter = fixture.manifest["deploy"]["secrets"]["FJORD_REDIS_PASSWORD"].clone();
    fixture
        .command(&aws, "verify", &[])
        .failed()
        .says(&format!(
            "PROBLEM: execution role {execution} does not exist"
        ))
        .says(&format!(
            "PROBLEM: secret {secret} (FJORD_KAFKA_PASSWORD) does not exist"
        ));
    granted(&fixture, &aws, "deploy");
    // The role, trusting ECS tasks, that may pull and log but not yet read the secret.
    let iam = aws_sdk_iam::Client::new(&aws.config);
    let secrets = aws_sdk_secretsmanager::Client::new(&aws.config);
    let role = execution.rsplit('/').next().unwrap();
    let task_role = fixture.manifest["deploy"]["roles"]["task_role_arn"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    for name in [role, task_role] {
        iam.create_role()
            .role_name(name)
            .assume_role_policy_document(
                json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                    "Principal": {"Service": "ecs-tasks.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
                .to_string(),
            )
            .send()
            .await
            .unwrap();
    }
    let created = secrets
        .create_secret()
        .name(format!("{}/kafka", fixture.name))
        .secret_string("not-a-real-token")
        .send()
        .await
        .unwrap();
    let secret = created.arn().unwrap().to_owned();
    let mut grants = vec![
        json!({"Effect": "Allow", "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"], "Resource": "*"}),
        json!({"Effect": "Allow", "Action": "logs:PutLogEvents", "Resource": format!("arn:aws:logs:{REGION}:123456789012:log-group:/ecs/{}:*", fixture.name)}),
        json!({"Effect": "Allow", "Action": "ssm:GetParameters", "Resource": parameter}),
    ];
    let put = |grants: &[Value]| {
        iam.put_role_policy()
            .role_name(role)
            .policy_name("mine")
            .policy_document(json!({"Version": "2012-10-17", "Statement": grants}).to_string())
            .send()
    };
    put(&grants).await.unwrap();
    fixture.write_edited(|m| {
        m["deploy"]["secrets"]["FJORD_KAFKA_PASSWORD"] = json!(format!("{secret}:password::"));
    });
    fixture
        .command(&aws, "verify", &[])
        .failed()
        .says(&format!(
            "ok: execution role {execution} exists; ECS tasks may assume it"
        ))
        .says(&format!(
            "ok: secret {secret} (FJORD_KAFKA_PASSWORD) exists"
        ))
        .says(&format!(
            "PROBLEM: the execution role may not read FJORD_KAFKA_PASSWORD (secret {secret})"
        ))
        .says(&format!(
            "ok: the execution role may pull images from {}/server",
            fixture.name
        ));
    // Granted as AWS matches it: the secret's own ARN, by its name and six characters.
    let name_arn = secret.rsplit_once('-').unwrap().0;
    grants.push(json!({"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": format!("{name_arn}-??????")}));
    put(&grants).await.unwrap();
    fixture
        .command(&aws, "verify", &[])
        .succeeded()
        .says("Everything the tasks need is there.");
    granted(&fixture, &aws, "deploy");
    fixture.write_manifest();

    // New images: revision 2 of each; rollback puts each service back on revision 1 and
    // waits as a deploy does.
    fixture.write_images("v2");
    fixture.deploy(&aws, &["--no-wait"]).succeeded();
    aws.proxy.take_calls();
    fixture
        .command(&aws, "rollback", &["--dry-run"])
        .succeeded()
        .says(&format!(
            "service {server}: would roll back {server}:2 → {server}:1"
        ));
    assert!(
        aws.service(&fixture.cluster, &server)
            .await
            .unwrap()
            .task_definition()
            .unwrap()
            .ends_with(&format!("{server}:2"))
    );
    fixture
        .command(
            &aws,
            "rollback",
            &["--wait-timeout", "20", "--poll-secs", "1"],
        )
        .succeeded()
        .says(&format!(
            "service {server}: rolled back {server}:2 → {server}:1"
        ))
        .says(&format!(
            "service {consumer}: rolled back {consumer}:2 → {consumer}:1"
        ))
        .says("services stable: yes");
    granted(&fixture, &aws, "deploy");
    for service in [&server, &consumer] {
        let running = aws.service(&fixture.cluster, service).await.unwrap();
        assert!(
            running
                .task_definition()
                .unwrap()
                .ends_with(&format!("{service}:1"))
        );
    }
    fixture
        .command(&aws, "rollback", &["--no-wait"])
        .failed()
        .says(&format!(
            "runs {server}:1, and the family has no earlier active revision"
        ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_deleted_moments_ago_is_created_again_once_drained() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("drain").await;
    fixture.deploy(&aws, &["--no-wait"]).succeeded();
    // Deleted as a destroy or a prune deletes it, through the proxy, which keeps it
    // DRAINING for a while as AWS does.
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(&aws.endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .load()
        .await;
    let ecs = aws_sdk_ecs::Client::new(&config);
    // Long enough for the dry run and the deploy to find it draining.
    aws.proxy.drain_for(std::time::Duration::from_secs(10));
    ecs.update_service()
        .cluster(&fixture.cluster)
        .service(fixture.consumer())
        .desired_count(0)
        .send()
        .await
        .unwrap();
    ecs.delete_service()
        .cluster(&fixture.cluster)
        .service(fixture.consumer())
        .send()
        .await
        .unwrap();

    fixture
        .deploy(&aws, &["--dry-run"])
        .succeeded()
        .says(&format!(
            "service {}: would create with 2 tasks once the deleted service of that name has drained",
            fixture.consumer()
        ));
    fixture
        .deploy(&aws, &["--no-wait", "--poll-secs", "1"])
        .succeeded()
        .says(&format!("  … ECS service {}: DRAINING", fixture.consumer()))
        .says(&format!(
            "service {}: created with 2 tasks",
            fixture.consumer()
        ));
    let consumer = aws
        .service(&fixture.cluster, &fixture.consumer())
        .await
        .unwrap();
    assert_eq!(consumer.status(), Some("ACTIVE"));
}

// ------------------------------------------------------------------------- ECR-shaped pushes, prune, destroy

/// `len` bytes that gzip cannot shrink (xorshift from `seed`).
fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// One request that passed through a [`Recorder`].
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    body: usize,
}

/// A front for the test registry that passes every request through unchanged and
/// records its method, path and body size, to show what a push sends on the wire.
struct Recorder {
    host: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
}

impl Recorder {
    fn start() -> Self {
        let upstream = required_env("FJORD_TEST_REGISTRY")
            .trim_start_matches("http://")
            .to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let log = std::sync::Arc::default();
        let shared = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (upstream, log) = (upstream.clone(), std::sync::Arc::clone(&shared));
                std::thread::spawn(move || Self::relay(client, &upstream, &log));
            }
        });
        Self { host, log }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }

    /// Relays HTTP/1.1 requests on one connection until the client closes it.
    fn relay(client: std::net::TcpStream, upstream: &str, log: &std::sync::Mutex<Vec<Recorded>>) {
        use std::io::{BufReader, Write as _};
        let server = std::net::TcpStream::connect(upstream).unwrap();
        let (mut to_client, mut to_server) =
            (client.try_clone().unwrap(), server.try_clone().unwrap());
        let (mut from_client, mut from_server) = (BufReader::new(client), BufReader::new(server));
        while let Some((head, body)) = Self::message(&mut from_client, false) {
            let mut request_line = head.lines().next().unwrap().split(' ');
            let method = request_line.next().unwrap().to_owned();
            let path = request_line.next().unwrap().to_owned();
            log.lock().unwrap().push(Recorded {
                method: method.clone(),
                path,
                body: body.len(),
            });
            to_server.write_all(head.as_bytes()).unwrap();
            to_server.write_all(&body).unwrap();
            let (head, body) = Self::message(&mut from_server, method == "HEAD").unwrap();
            to_client.write_all(head.as_bytes()).unwrap();
            to_client.write_all(&body).unwrap();
        }
    }

    /// Reads one message: its head (through the blank line) and its body, sized by
    /// Content-Length (the registry and reqwest both send one). `None` at end of stream.
    fn message(from: &mut impl std::io::BufRead, head_only: bool) -> Option<(String, Vec<u8>)> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if from.read_line(&mut line).ok()? == 0 {
                return None;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; if head_only { 0 } else { length }];
        from.read_exact(&mut body).unwrap();
        Some((head, body))
    }
}

/// The size of a blob in the registry, by its HTTP API; `None` if it has none.
async fn registry_blob_size(repository: &str, digest: &str) -> Option<u64> {
    let registry = required_env("FJORD_TEST_REGISTRY");
    let answer = registry_answer(
        reqwest::Client::new().head(format!("{registry}/v2/{repository}/blobs/{digest}")),
    )
    .await?;
    Some(
        answer.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_mib_layer_pushes_and_an_unchanged_image_sends_nothing() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("bigpush").await;
    let name = &fixture.name;
    // A 12 MiB layer: more than the 5 MiB that ECR wants of every part but the last, and
    // more than oci-client's 4 MiB chunks, so a chunked upload would take several parts.
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let big = incompressible(12 << 20, seed);
    write_archive(
        &fixture.path("server.tar.gz"),
        "fjord-server:big",
        &[b"base", &big],
        "amd64",
        true,
    );
    let image = Image::read(&fixture.path("server.tar.gz"), Architecture::X86_64).unwrap();
    let layer = &image.layers[1];
    assert!(layer.data.len() > 12 << 20, "the layer stays above 12 MiB");

    let recorder = Recorder::start();
    let registry = format!("http://{}", recorder.host);
    fixture
        .deploy_to(&aws, &registry, &["--no-wait"])
        .succeeded()
        .says(&format!(
            "image {name}/server: pushed 3 of 3 blobs (0 already there) to {}, 12.0 MiB, tagged {} as big",
            recorder.host, image.manifest.digest
        ));
    // On the wire: no chunk (PATCH) at all; each blob is one PUT carrying all of it.
    let requests = recorder.requests();
    assert!(
        requests.iter().all(|r| r.method != "PATCH"),
        "{requests:#?}"
    );
    let server_uploads: Vec<usize> = requests
        .iter()
        .filter(|r| {
            r.method == "PUT"
                && r.path
                    .starts_with(&format!("/v2/{name}/server/blobs/uploads/"))
        })
        .map(|r| r.body)
        .collect();
    let mut sizes: Vec<usize> = image.blobs().map(|b| b.data.len()).collect();
    sizes.sort_unstable();
    let mut sent = server_uploads.clone();
    sent.sort_unstable();
    assert_eq!(sent, sizes, "one whole-blob PUT per blob: {requests:#?}");
    assert_eq!(
        registry_blob_size(&format!("{name}/server"), &layer.digest).await,
        Some(layer.data.len() as u64),
        "the registry holds the whole layer"
    );
    assert_eq!(
        registry_digest(&format!("{name}/server"), "big").await,
        Some(image.manifest.digest.clone())
    );

    // The same image again: the dry run and the deploy say so, and send nothing.
    fixture
        .deploy_to(&aws, &registry, &["--dry-run"])
        .succeeded()
        .says(&format!(
            "image {name}/server: unchanged: all 3 blobs already there and {} already tagged big",
            image.manifest.digest
        ));
    // The registry only gets looked at.
    let before = recorder.requests().len();
    fixture
        .deploy_to(&aws, &registry, &["--no-wait"])
        .succeeded()
        .says(&format!(
            "image {name}/server: unchanged: all 3 blobs already there and {} already tagged big; nothing sent",
            image.manifest.digest
        ))
        .says(&format!("image {name}/consumer: unchanged"));
    let again = &recorder.requests()[before..];
    assert!(
        again
            .iter()
            .all(|r| r.method == "HEAD" || r.method == "GET"),
        "{again:#?}"
    );
}

/// The fixture's manifest with a second consumer group, `audit`, of one member, that
/// takes one of the first group's two topics (a topic belongs to one group).
fn with_audit_group(manifest: &mut Value) {
    let groups = manifest["consumer_groups"].as_array_mut().unwrap();
    let topic = groups[0]["topics"].as_array_mut().unwrap().pop().unwrap();
    groups.push(json!({ "id": "audit", "topics": [topic], "members": 1 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_consumer_group_is_pruned_after_a_dry_run_shows_it() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("prune").await;
    let audit = format!("{}-consumer-audit", fixture.name);
    fixture.write_edited(with_audit_group);
    fixture
        .deploy(&aws, &["--no-wait"])
        .succeeded()
        .says(&format!("service {audit}: created with 1 tasks"));
    assert!(aws.service(&fixture.cluster, &audit).await.is_some());

    // The group leaves the manifest: the dry run says what would go, and nothing goes.
    fixture.write_manifest();
    fixture
        .deploy(&aws, &["--dry-run"])
        .succeeded()
        .says(&format!(
            "service {audit} (consumer group no longer in the manifest): would remove: drain 1 task(s), then delete"
        ))
        .says(&format!(
            "task definition {audit} (consumer group no longer in the manifest): would deregister 1 and delete 1 revision(s)"
        ));
    assert!(aws.service(&fixture.cluster, &audit).await.is_some());
    assert_eq!(aws.revisions(&audit).await, 1);

    let run = fixture
        .deploy(&aws, &["--no-wait", "--poll-secs", "1"])
        .succeeded();
    run.says(&format!(
        "service {audit} (consumer group no longer in the manifest): removed: drained 1 task(s) in"
    ))
    .says(&format!(
        "task definition {audit} (consumer group no longer in the manifest): deregistered 1 and deleted 1 revision(s)"
    ));
    assert!(
        aws.service(&fixture.cluster, &audit).await.is_none(),
        "pruned"
    );
    assert_eq!(aws.revisions(&audit).await, 0);
    granted(&fixture, &aws, "deploy");
    // The group that stays keeps running.
    assert!(
        aws.service(&fixture.cluster, &fixture.consumer())
            .await
            .is_some()
    );

    // Pruned once: the next deploy has nothing to prune.
    let run = fixture.deploy(&aws, &["--no-wait"]).succeeded();
    assert!(
        !run.stdout.contains("no longer in the manifest"),
        "{}",
        run.stdout
    );
}

/// A service named like the deployment's consumers, made by hand, not by the tool.
async fn handmade_service(aws: &Aws, fixture: &Fixture) -> String {
    let name = format!("{}-consumer-handmade", fixture.name);
    let container = aws_sdk_ecs::types::ContainerDefinition::builder()
        .name("app")
        .image("public.ecr.aws/docker/library/busybox:latest")
        .memory(128)
        .build();
    aws.ecs
        .register_task_definition()
        .family(&name)
        .container_definitions(container)
        .send()
        .await
        .unwrap();
    let network = aws_sdk_ecs::types::NetworkConfiguration::builder()
        .awsvpc_configuration(
            aws_sdk_ecs::types::AwsVpcConfiguration::builder()
                .set_subnets(Some(aws.subnets.clone()))
                .security_groups(&aws.security_group)
                .build()
                .unwrap(),
        )
        .build();
    aws.ecs
        .create_service()
        .cluster(&fixture.cluster)
        .service_name(&name)
        .task_definition(&name)
        .desired_count(1)
        .network_configuration(network)
        .send()
        .await
        .unwrap();
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_removes_what_deploys_made_and_spares_the_rest() {
    let _one = EMULATOR.lock().await;
    let (fixture, aws) = Fixture::new("destroy").await;
    let (name, cluster) = (fixture.name.clone(), fixture.cluster.clone());
    // Made before the first deploy by someone else: the deploy uses it, destroy leaves it.
    aws.ecr
        .create_repository()
        .repository_name(format!("{name}/consumer"))
        .send()
        .await
        .unwrap();
    fixture.deploy(&aws, &["--no-wait"]).succeeded();
    granted(&fixture, &aws, "deploy");
    let handmade = handmade_service(&aws, &fixture).await;
    let resource = format!("service/{cluster}/{}", fixture.server());
    let scaling = async |aws: &Aws| {
        let targets = aws.scalable_targets(&resource).await;
        (targets.len(), aws.scaling_policies(&resource).await.len())
    };
    let log_groups = async |aws: &Aws| aws.log_groups(&format!("/ecs/{name}")).await.len();
    assert_eq!(scaling(&aws).await, (1, 2));

    // The dry run lists it all and removes nothing.
    fixture
        .destroy(&aws, &["--dry-run"])
        .succeeded()
        .says("(dry run: nothing will be changed)")
        .says(&format!(
            "service {}: would remove (with its scaling target and 2 policies): drain 2 task(s), then delete",
            fixture.server()
        ))
        .says(&format!(
            "service {}: would remove: drain 2 task(s), then delete",
            fixture.consumer()
        ))
        .says(&format!(
            "task definition {}: would deregister 1 and delete 1 revision(s)",
            fixture.server()
        ))
        .says(&format!(
            "left: ECR repository {name}/server (kept; --repositories removes it)"
        ))
        .says(&format!(
            "left: log group /ecs/{name} (kept; --log-group removes it)"
        ))
        .says("Dry run: nothing was changed.");
    assert!(aws.service(&cluster, &fixture.server()).await.is_some());
    assert_eq!(aws.revisions(&fixture.server()).await, 1);
    assert_eq!(scaling(&aws).await, (1, 2));

    let run = fixture.destroy(&aws, &["--poll-secs", "1"]).succeeded();
    granted(&fixture, &aws, "destroy");
    run.says(&format!(
        "service {}: removed (with its scaling target and 2 policies): drained 2 task(s) in",
        fixture.server()
    ))
    .says(&format!(
        "task definition {}: deregistered 1 and deleted 1 revision(s)",
        fixture.consumer()
    ));
    assert!(!run.stdout.contains(&handmade), "{}", run.stdout);
    for service in [fixture.server(), fixture.consumer()] {
        assert!(aws.service(&cluster, &service).await.is_none(), "{service}");
        assert_eq!(aws.revisions(&service).await, 0, "{service}");
    }
    assert_eq!(scaling(&aws).await, (0, 0));
    // Not made by the tool: still there, untouched.
    let spared = aws.service(&cluster, &handmade).await.unwrap();
    assert_eq!(spared.desired_count(), 1);
    assert_eq!(aws.revisions(&handmade).await, 1);
    // Not asked for: repositories and logs stay.
    assert_eq!(aws.repositories().await.len(), 2);
    assert_eq!(log_groups(&aws).await, 1);

    // Again: nothing left, and it says so.
    fixture.destroy(&aws, &[]).succeeded().says(&format!(
        "Nothing left of {name} that fjord-deploy created and this run removes."
    ));

    // Asked for: the repository and log group the deploy created go; the repository it
    // found already there stays.
    fixture
        .destroy(&aws, &["--repositories", "--log-group"])
        .succeeded()
        .says(&format!(
            "ECR repository {name}/server: deleted, with its images"
        ))
        .says(&format!("log group /ecs/{name}: deleted"))
        .says(&format!(
            "left: ECR repository {name}/consumer (not created by fjord-deploy: no fjord:deployment tag)"
        ));
    assert_eq!(aws.repositories().await, [format!("{name}/consumer")]);
    assert_eq!(log_groups(&aws).await, 0);
    granted(&fixture, &aws, "destroy");
    fixture
        .destroy(&aws, &["--repositories", "--log-group"])
        .succeeded()
        .says(&format!(
            "Nothing left of {name} that fjord-deploy created and this run removes."
        ));
    assert!(aws.service(&cluster, &handmade).await.is_some());
}

// ------------------------------------------------------------------------- bootstrap

/// What stands between the tool and moto (the tool itself talks to AWS as it is): it
/// records every AWS operation the tool calls, as `service:Operation` (the IAM action),
/// and makes up for what moto does not do as AWS does.
///
/// - ElastiCache: moto has no DeleteCacheSubnetGroup, and a replication group it deletes
///   stays `deleting` forever where AWS removes it after a few minutes. The proxy answers
///   DeleteCacheSubnetGroup itself and, from then on, answers for a deleted subnet group
///   or replication group as AWS does once it is gone (not found).
/// - ECS: moto's UpdateService leaves the PRIMARY deployment as CreateService made it
///   (its task definition, counts and rollout state), where AWS's PRIMARY deployment is
///   the one the update started. The proxy fills DescribeServices' PRIMARY deployment in
///   from the service, as AWS reports it.
/// - ECS settings: moto keeps no deployment configuration or health check grace period;
///   the proxy remembers what CreateService and UpdateService set and DescribeServices
///   answers with it, as AWS does.
/// - ECS draining: moto makes a deleted service INACTIVE at once, where AWS keeps it
///   DRAINING until its tasks have stopped, refusing meanwhile a new service of the same
///   name and the deletion of its cluster. The proxy keeps a service it saw deleted
///   DRAINING for [`DRAINING_FOR`], and refuses those calls as AWS does.
/// - ECS rollbacks: for a service named in [`MotoProxy::roll_back`], each UpdateService
///   that changes its task definition is followed by a second one back to the revision it
///   ran before, as the deployment circuit breaker does when the new tasks fail; ListTasks
///   and DescribeTasks then answer for a stopped task of the new revision, stopped with
///   [`ROLLED_BACK_REASON`].
///
/// Every other request goes to moto unchanged. The tests run on a multi-thread runtime:
/// the tool runs as a blocking child process, and the proxy needs a worker of its own.
struct MotoProxy {
    endpoint: String,
    shared: std::sync::Arc<std::sync::Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MotoProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a deleted service stays DRAINING behind the proxy.
const DRAINING_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// An ECS error answer, as the JSON protocol carries it.
fn ecs_error(kind: &str, message: &str) -> (u16, String, Vec<u8>) {
    (
        400,
        "application/x-amz-json-1.1".to_owned(),
        json!({ "__type": kind, "message": message })
            .to_string()
            .into_bytes(),
    )
}

/// Why the task of a rolled-back revision stopped, as ECS says it.
const ROLLED_BACK_REASON: &str = "Essential container in task exited";

/// What the proxy remembers.
#[derive(Default)]
struct ProxyState {
    /// ElastiCache subnet groups deleted through the proxy.
    subnet_groups: std::collections::HashSet<String>,
    /// ElastiCache replication groups deleted through the proxy.
    replication_groups: std::collections::HashSet<String>,
    /// ECS services whose updates are rolled back.
    roll_back: std::collections::HashSet<String>,
    /// Deleted ECS services, with when they stop DRAINING.
    draining: std::collections::HashMap<String, std::time::Instant>,
    /// The settings moto keeps no record of, by service, as the last create or update
    /// set them: `deploymentConfiguration`, `healthCheckGracePeriodSeconds`.
    settings: std::collections::HashMap<String, serde_json::Map<String, Value>>,
    /// The stopped tasks of rolled-back revisions, as DescribeTasks answers them.
    stopped: Vec<Value>,
    /// How long the next deleted services drain, when not [`DRAINING_FOR`].
    drain_window: Option<std::time::Duration>,
    /// Every operation passed on, as `service:Operation`, in order.
    calls: Vec<String>,
}

fn form(body: &str) -> std::collections::HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let v = v
                .replace("%2F", "/")
                .replace("%3A", ":")
                .replace("%2D", "-");
            (k.to_owned(), v)
        })
        .collect()
}

fn query_answer(status: u16, body: &str) -> (u16, String) {
    (status, body.to_owned())
}

fn not_found(code: &str) -> (u16, String) {
    query_answer(
        404,
        &format!(
            r#"<ErrorResponse xmlns="http://elasticache.amazonaws.com/doc/2015-02-02/"><Error><Type>Sender</Type><Code>{code}</Code><Message>not found</Message></Error><RequestId>proxy</RequestId></ErrorResponse>"#
        ),
    )
}

/// One HTTP request as the proxy read it.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The IAM action this request calls: the service from the signature's credential
    /// scope, the operation from `X-Amz-Target` (JSON protocols) or `Action=` (query).
    fn action(&self) -> Option<String> {
        let scope = self.header("authorization")?.split("Credential=").nth(1)?;
        let service = scope.split('/').nth(3)?;
        let operation = match self.header("x-amz-target") {
            Some(target) => target.rsplit('.').next()?.to_owned(),
            None => form(&String::from_utf8_lossy(&self.body))
                .get("Action")?
                .clone(),
        };
        Some(format!("{service}:{operation}"))
    }

    /// Sends this request to `moto`; its answer.
    async fn forward(&self, http: &reqwest::Client, moto: &str) -> (u16, String, Vec<u8>) {
        let mut request = http.request(
            reqwest::Method::from_bytes(self.method.as_bytes()).unwrap(),
            format!("{moto}{}", self.path),
        );
        for (k, v) in &self.headers {
            if !k.eq_ignore_ascii_case("host") && !k.eq_ignore_ascii_case("content-length") {
                request = request.header(k, v);
            }
        }
        let response = request.body(self.body.clone()).send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/xml")
            .to_owned();
        (
            status,
            content_type,
            response.bytes().await.unwrap().to_vec(),
        )
    }

    /// The same ECS call with another operation and body.
    fn ecs(&self, operation: &str, body: &Value) -> Self {
        let mut headers: Vec<(String, String)> = self
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("x-amz-target"))
            .cloned()
            .collect();
        headers.push((
            "X-Amz-Target".to_owned(),
            format!("AmazonEC2ContainerServiceV20141113.{operation}"),
        ));
        Self {
            method: self.method.clone(),
            path: self.path.clone(),
            headers,
            body: serde_json::to_vec(body).unwrap(),
        }
    }
}

/// DescribeServices' answer with each PRIMARY deployment filled in from its service.
fn as_aws_reports_deployments(answer: &[u8]) -> Vec<u8> {
    let Ok(mut answer) = serde_json::from_slice::<Value>(answer) else {
        return answer.to_vec();
    };
    for service in answer["services"].as_array_mut().into_iter().flatten() {
        let (running, pending, desired) = (
            service["runningCount"].clone(),
            service["pendingCount"].clone(),
            service["desiredCount"].clone(),
        );
        let settled = running.as_i64() >= desired.as_i64() && pending.as_i64() == Some(0);
        let task_definition = service["taskDefinition"].clone();
        for deployment in service["deployments"].as_array_mut().into_iter().flatten() {
            if deployment["status"] == "PRIMARY" {
                deployment["taskDefinition"] = task_definition.clone();
                deployment["runningCount"] = running.clone();
                deployment["pendingCount"] = pending.clone();
                deployment["desiredCount"] = desired.clone();
                deployment["rolloutState"] =
                    json!(if settled { "COMPLETED" } else { "IN_PROGRESS" });
            }
        }
    }
    serde_json::to_vec(&answer).unwrap()
}

impl MotoProxy {
    async fn start(moto: &str) -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let moto = moto.to_owned();
        let shared = std::sync::Arc::new(std::sync::Mutex::new(ProxyState::default()));
        let state = shared.clone();
        let http = reqwest::Client::new();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let (moto, state, http) = (moto.clone(), state.clone(), http.clone());
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    loop {
                        // One request: the head, then Content-Length bytes of body.
                        let head_end = loop {
                            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            let mut chunk = [0u8; 8192];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
                        let mut lines = head.split("\r\n");
                        let request_line = lines.next().unwrap_or_default().to_owned();
                        let headers: Vec<(String, String)> = lines
                            .filter_map(|l| l.split_once(':'))
                            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                            .collect();
                        let length: usize = headers
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, v)| v.parse().ok())
                            .unwrap_or(0);
                        while buffer.len() < head_end + length {
                            let mut chunk = [0u8; 8192];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body: Vec<u8> = buffer[head_end..head_end + length].to_vec();
                        buffer.drain(..head_end + length);
                        let mut parts = request_line.split(' ');
                        let request = Request {
                            method: parts.next().unwrap_or("GET").to_owned(),
                            path: parts.next().unwrap_or("/").to_owned(),
                            headers,
                            body,
                        };
                        let (status, content_type, answer) =
                            Self::answer(&request, &state, &http, &moto).await;
                        let head = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                            answer.len()
                        );
                        if socket.write_all(head.as_bytes()).await.is_err()
                            || socket.write_all(&answer).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            endpoint,
            shared,
            task,
        }
    }

    /// ECS rolls back every update of `service` that changes its task definition.
    fn roll_back(&self, service: &str) {
        self.shared
            .lock()
            .unwrap()
            .roll_back
            .insert(service.to_owned());
    }

    /// Services deleted from now on drain for `window`.
    fn drain_for(&self, window: std::time::Duration) {
        self.shared.lock().unwrap().drain_window = Some(window);
    }

    /// The operations called through the proxy since the last look, as
    /// `service:Operation`.
    fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.shared.lock().unwrap().calls)
    }

    async fn answer(
        request: &Request,
        state: &std::sync::Mutex<ProxyState>,
        http: &reqwest::Client,
        moto: &str,
    ) -> (u16, String, Vec<u8>) {
        let action = request.action().unwrap_or_default();
        let fields = form(&String::from_utf8_lossy(&request.body));
        let answered = {
            let mut state = state.lock().unwrap();
            state.calls.push(action.clone());
            match action.as_str() {
                "elasticache:DeleteCacheSubnetGroup" => {
                    let name = fields
                        .get("CacheSubnetGroupName")
                        .cloned()
                        .unwrap_or_default();
                    state.subnet_groups.insert(name);
                    Some(query_answer(
                        200,
                        r#"<DeleteCacheSubnetGroupResponse xmlns="http://elasticache.amazonaws.com/doc/2015-02-02/"><ResponseMetadata><RequestId>proxy</RequestId></ResponseMetadata></DeleteCacheSubnetGroupResponse>"#,
                    ))
                }
                "elasticache:DescribeCacheSubnetGroups"
                    if fields
                        .get("CacheSubnetGroupName")
                        .is_some_and(|n| state.subnet_groups.contains(n)) =>
                {
                    Some(not_found("CacheSubnetGroupNotFoundFault"))
                }
                "elasticache:DescribeReplicationGroups"
                    if fields
                        .get("ReplicationGroupId")
                        .is_some_and(|n| state.replication_groups.contains(n)) =>
                {
                    Some(not_found("ReplicationGroupNotFoundFault"))
                }
                "elasticache:DeleteReplicationGroup" => {
                    if let Some(id) = fields.get("ReplicationGroupId") {
                        state.replication_groups.insert(id.clone());
                    }
                    None
                }
                _ => None,
            }
        };
        if let Some((status, answer)) = answered {
            return (status, "text/xml".to_owned(), answer.into_bytes());
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        if let ("ecs:CreateService" | "ecs:UpdateService", Some(name)) = (
            action.as_str(),
            body["serviceName"].as_str().or(body["service"].as_str()),
        ) {
            let mut state = state.lock().unwrap();
            let settings = state.settings.entry(name.to_owned()).or_default();
            for key in ["deploymentConfiguration", "healthCheckGracePeriodSeconds"] {
                if !body[key].is_null() {
                    settings.insert(key.to_owned(), body[key].clone());
                }
            }
        }
        let draining = |name: &Value| {
            let mut state = state.lock().unwrap();
            state
                .draining
                .retain(|_, until| *until > std::time::Instant::now());
            name.as_str()
                .is_some_and(|n| state.draining.contains_key(n))
        };
        match action.as_str() {
            "ecs:DescribeServices" => {
                let (status, content_type, answer) = request.forward(http, moto).await;
                let mut answer: Value =
                    serde_json::from_slice(&as_aws_reports_deployments(&answer))
                        .unwrap_or_default();
                for service in answer["services"].as_array_mut().into_iter().flatten() {
                    if draining(&service["serviceName"]) {
                        service["status"] = json!("DRAINING");
                    }
                    let name = service["serviceName"].as_str().unwrap_or_default();
                    if let Some(settings) = state.lock().unwrap().settings.get(name) {
                        for (key, value) in settings {
                            service[key] = value.clone();
                        }
                    }
                }
                (status, content_type, serde_json::to_vec(&answer).unwrap())
            }
            "ecs:ListTasks" if body["desiredStatus"] == "STOPPED" => {
                let arns: Vec<Value> = state
                    .lock()
                    .unwrap()
                    .stopped
                    .iter()
                    .map(|task| task["taskArn"].clone())
                    .collect();
                let answer = json!({ "taskArns": arns }).to_string().into_bytes();
                (200, "application/x-amz-json-1.1".to_owned(), answer)
            }
            "ecs:DescribeTasks"
                if {
                    let state = state.lock().unwrap();
                    body["tasks"].as_array().is_some_and(|asked| {
                        asked
                            .iter()
                            .all(|arn| state.stopped.iter().any(|t| t["taskArn"] == *arn))
                    })
                } =>
            {
                let tasks = state.lock().unwrap().stopped.clone();
                let answer = json!({ "tasks": tasks, "failures": [] })
                    .to_string()
                    .into_bytes();
                (200, "application/x-amz-json-1.1".to_owned(), answer)
            }
            "ecs:CreateService" if draining(&body["serviceName"]) => ecs_error(
                "InvalidParameterException",
                "Unable to Start a service that is still Draining.",
            ),
            "ecs:DeleteCluster"
                if {
                    let mut state = state.lock().unwrap();
                    state
                        .draining
                        .retain(|_, until| *until > std::time::Instant::now());
                    !state.draining.is_empty()
                } =>
            {
                ecs_error(
                    "ClusterContainsServicesException",
                    "The Cluster cannot be deleted while Services are active.",
                )
            }
            "ecs:DeleteService" => {
                let answer = request.forward(http, moto).await;
                if answer.0 == 200 {
                    let name = body["service"].as_str().unwrap_or_default();
                    let name = name.rsplit('/').next().unwrap_or(name).to_owned();
                    let mut state = state.lock().unwrap();
                    let until =
                        std::time::Instant::now() + state.drain_window.unwrap_or(DRAINING_FOR);
                    state.draining.insert(name, until);
                }
                answer
            }
            "ecs:UpdateService" => {
                let update = body;
                let service = update["service"].as_str().unwrap_or_default().to_owned();
                let rolled_back = state.lock().unwrap().roll_back.contains(&service)
                    && update["taskDefinition"].is_string();
                if !rolled_back {
                    return request.forward(http, moto).await;
                }
                let describe = request.ecs(
                    "DescribeServices",
                    &json!({"cluster": update["cluster"], "services": [service]}),
                );
                let (_, _, before) = describe.forward(http, moto).await;
                let before: Value = serde_json::from_slice(&before).unwrap();
                let previous = before["services"][0]["taskDefinition"].clone();
                let answer = request.forward(http, moto).await;
                let back = request.ecs(
                    "UpdateService",
                    &json!({
                        "cluster": update["cluster"],
                        "service": service,
                        "taskDefinition": previous,
                    }),
                );
                back.forward(http, moto).await;
                // The failed revision's task, stopped, as the tasks the breaker counted
                // (moto cannot run a task whose containers name no memory of their own).
                let mut state = state.lock().unwrap();
                let id = state.stopped.len();
                state.stopped.push(json!({
                    "taskArn": format!("arn:aws:ecs:{REGION}:123456789012:task/{}/rolledback{id}", update["cluster"].as_str().unwrap_or_default()),
                    "taskDefinitionArn": update["taskDefinition"],
                    "lastStatus": "STOPPED",
                    "desiredStatus": "STOPPED",
                    "stoppedReason": ROLLED_BACK_REASON,
                    "containers": [{ "name": "server", "exitCode": 1, "lastStatus": "STOPPED" }],
                }));
                answer
            }
            _ => request.forward(http, moto).await,
        }
    }
}

/// A bootstrap test's AWS: moto freshly reset, clients, and the proxy the tool talks to.
struct Empty {
    ec2: aws_sdk_ec2::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    elasticache: aws_sdk_elasticache::Client,
    iam: aws_sdk_iam::Client,
    secrets: aws_sdk_secretsmanager::Client,
    ecs: aws_sdk_ecs::Client,
    /// For the deploy onto what bootstrap made.
    aws: Aws,
}

impl Empty {
    async fn account() -> Self {
        let (endpoint, config) = reset_moto().await;
        let proxy = MotoProxy::start(&endpoint).await;
        Self {
            ec2: aws_sdk_ec2::Client::new(&config),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&config),
            elasticache: aws_sdk_elasticache::Client::new(&config),
            iam: aws_sdk_iam::Client::new(&config),
            secrets: aws_sdk_secretsmanager::Client::new(&config),
            ecs: aws_sdk_ecs::Client::new(&config),
            aws: Aws {
                endpoint: proxy.endpoint.clone(),
                proxy,
                config: config.clone(),
                ecs: aws_sdk_ecs::Client::new(&config),
                ecr: aws_sdk_ecr::Client::new(&config),
                elb: aws_sdk_elasticloadbalancingv2::Client::new(&config),
                scaling: aws_sdk_applicationautoscaling::Client::new(&config),
                logs: aws_sdk_cloudwatchlogs::Client::new(&config),
                subnets: Vec::new(),
                security_group: String::new(),
                target_group_arn: String::new(),
                load_balancer_arn: String::new(),
                dns_name: String::new(),
            },
        }
    }

    fn tagged(name: &str) -> aws_sdk_ec2::types::Filter {
        aws_sdk_ec2::types::Filter::builder()
            .name("tag:fjord:deployment")
            .values(name)
            .build()
    }

    /// Everything left in the account that carries the deployment's tag, by kind.
    async fn tagged_resources(&self, name: &str) -> Vec<String> {
        let mut left = Vec::new();
        // One EC2 kind: its Describe call filtered by the tag, each left one as `label id`.
        macro_rules! ec2_tagged {
            ($describe:ident . $filter:ident, $list:ident, $label:literal, $id:ident $(, $keep:expr)?) => {
                let found = self
                    .ec2
                    .$describe()
                    .$filter(Self::tagged(name))
                    .send()
                    .await
                    .unwrap();
                left.extend(
                    found
                        .$list()
                        .iter()
                        $(.filter($keep))?
                        .map(|item| format!(concat!($label, " {:?}"), item.$id())),
                );
            };
        }
        ec2_tagged!(describe_vpcs.filters, vpcs, "vpc", vpc_id);
        ec2_tagged!(describe_subnets.filters, subnets, "subnet", subnet_id);
        ec2_tagged!(
            describe_security_groups.filters,
            security_groups,
            "sg",
            group_id
        );
        ec2_tagged!(
            describe_nat_gateways.filter,
            nat_gateways,
            "nat",
            nat_gateway_id,
            |n: &&aws_sdk_ec2::types::NatGateway| n.state().map(|s| s.as_str()) != Some("deleted")
        );
        ec2_tagged!(describe_addresses.filters, addresses, "eip", allocation_id);
        ec2_tagged!(
            describe_route_tables.filters,
            route_tables,
            "rtb",
            route_table_id
        );
        ec2_tagged!(
            describe_internet_gateways.filters,
            internet_gateways,
            "igw",
            internet_gateway_id
        );
        let balancers = self.elb.describe_load_balancers().send().await.unwrap();
        left.extend(
            balancers
                .load_balancers()
                .iter()
                .map(|b| format!("lb {:?}", b.load_balancer_name())),
        );
        let groups = self.elb.describe_target_groups().send().await.unwrap();
        left.extend(
            groups
                .target_groups()
                .iter()
                .map(|g| format!("tg {:?}", g.target_group_name())),
        );
        // moto keeps a deleted replication group as `deleting` for ever (see MotoProxy).
        let redis = self
            .elasticache
            .describe_replication_groups()
            .send()
            .await
            .unwrap();
        left.extend(
            redis
                .replication_groups()
                .iter()
                .filter(|g| g.status() != Some("deleting"))
                .map(|g| format!("redis {:?}", g.replication_group_id())),
        );
        let secrets = self.secrets.list_secrets().send().await.unwrap();
        left.extend(
            secrets
                .secret_list()
                .iter()
                .map(|s| format!("secret {:?}", s.name())),
        );
        let roles = self.iam.list_roles().send().await.unwrap();
        left.extend(
            roles
                .roles()
                .iter()
                .filter(|r| r.role_name().starts_with(name))
                .map(|r| format!("role {}", r.role_name())),
        );
        // A deleted cluster stays described, INACTIVE, for a while (in AWS too).
        let arns = self.ecs.list_clusters().send().await.unwrap();
        let clusters = self
            .ecs
            .describe_clusters()
            .set_clusters(Some(arns.cluster_arns().to_vec()))
            .send()
            .await
            .unwrap();
        left.extend(
            clusters
                .clusters()
                .iter()
                .filter(|c| c.status() == Some("ACTIVE"))
                .map(|c| format!("cluster {:?}", c.cluster_name())),
        );
        left
    }
}

/// The shipped example as a new user has it before bootstrap: no network, roles,
/// cluster, target group or Redis secret yet.
fn empty_account_manifest(name: &str) -> Value {
    let mut manifest: Value = serde_json::from_str(fjord_config::EXAMPLE).unwrap();
    let deploy = manifest["deploy"].as_object_mut().unwrap();
    for field in ["cluster", "network", "roles", "logs"] {
        deploy.remove(field);
    }
    deploy["region"] = json!(REGION);
    deploy["name"] = json!(name);
    deploy["secrets"]
        .as_object_mut()
        .unwrap()
        .remove("FJORD_REDIS_PASSWORD");
    deploy["services"]["server"]
        .as_object_mut()
        .unwrap()
        .remove("target_group_arn");
    manifest
}

/// A fixture of [`empty_account_manifest`], its manifest written.
fn empty_account_fixture(name: &str) -> Fixture {
    let fixture = Fixture {
        dir: tempfile::tempdir().unwrap(),
        name: name.to_owned(),
        cluster: name.to_owned(),
        manifest: empty_account_manifest(name),
    };
    fixture.write_manifest();
    fixture
}

fn bootstrap_run(fixture: &Fixture, aws: &Aws, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fjord-deploy"));
    command
        .arg("bootstrap")
        .arg(fixture.path("manifest.json"))
        .args(["--poll-secs", "1"]);
    Fixture::run(command, aws, args)
}

fn read_manifest(fixture: &Fixture) -> String {
    std::fs::read_to_string(fixture.path("manifest.json")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_an_empty_account_bootstrap_deploy_and_destroy_leave_nothing() {
    let _one = EMULATOR.lock().await;
    let account = Empty::account().await;
    let aws = &account.aws;
    let name = unique("boot");
    let fixture = empty_account_fixture(&name);
    fixture.write_images("v1");
    let before = read_manifest(&fixture);

    // The plan first: nothing made, nothing written.
    bootstrap_run(&fixture, aws, &["--dry-run"])
        .succeeded()
        .says("network: would create VPC, 4 subnets, internet gateway")
        .says("Redis: would create AUTH token secret, cache subnet group, replication group")
        .says("Would set in")
        .says("$.deploy.network.subnets = ");
    granted(&fixture, aws, "bootstrap");
    assert_eq!(read_manifest(&fixture), before);
    assert!(account.tagged_resources(&name).await.is_empty());

    let run = bootstrap_run(&fixture, aws, &[]).succeeded();
    granted(&fixture, aws, "bootstrap");
    run.says("network: vpc-")
        .says("Kafka must accept connections from the NAT gateways' addresses: ")
        .says("Wrote ")
        .says("Next: fjord-deploy deploy");
    let written: Value = serde_json::from_str(&read_manifest(&fixture)).unwrap();
    let deploy = &written["deploy"];
    assert_eq!(deploy["cluster"], json!(name));
    assert_eq!(deploy["network"]["subnets"].as_array().unwrap().len(), 2);
    assert_eq!(deploy["logs"]["group"], json!(format!("/ecs/{name}")));
    assert!(
        written["redis"]["url"]
            .as_str()
            .unwrap()
            .starts_with("rediss://"),
        "{written}"
    );
    assert!(written["redis"].get("username").is_none());
    assert!(
        deploy["secrets"]["FJORD_REDIS_PASSWORD"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:secretsmanager:")
    );
    // The rest of the file as it was, in its order.
    let order = |text: &str| match fjord_deploy::document::Json::parse(text).unwrap() {
        fjord_deploy::document::Json::Object(entries) => {
            entries.into_iter().map(|(k, _)| k).collect::<Vec<_>>()
        }
        other => panic!("not an object: {other:?}"),
    };
    assert_eq!(order(&read_manifest(&fixture)), order(&before));
    assert_eq!(written["endpoints"], fixture.manifest["endpoints"]);
    fjord_deploy::Deployment::load(&fixture.path("manifest.json")).unwrap();

    // What a deploy checks and the streams need.
    let target_group = deploy["services"]["server"]["target_group_arn"]
        .as_str()
        .unwrap();
    let groups = account
        .elb
        .describe_target_groups()
        .target_group_arns(target_group)
        .send()
        .await
        .unwrap();
    let group = &groups.target_groups()[0];
    assert_eq!(group.health_check_path(), Some("/readyz"));
    assert_eq!(group.target_type().map(|t| t.as_str()), Some("ip"));
    let redis = account
        .elasticache
        .describe_replication_groups()
        .replication_group_id(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        redis.replication_groups()[0].transit_encryption_enabled(),
        Some(true)
    );
    let nats = account
        .ec2
        .describe_nat_gateways()
        .filter(Empty::tagged(&name))
        .send()
        .await
        .unwrap();
    assert_eq!(
        nats.nat_gateways().len(),
        1,
        "one NAT gateway unless the manifest asks for one per zone"
    );

    // Again: nothing changes, the file included.
    let written_text = read_manifest(&fixture);
    let again = bootstrap_run(&fixture, aws, &[]).succeeded();
    again
        .says("network: exists: vpc-")
        .says("load balancer: exists: ")
        .says("Redis: exists: rediss://")
        .says("ECS cluster: exists")
        .says("already names all of it");
    assert!(!again.stdout.contains("created"), "{}", again.stdout);
    granted(&fixture, aws, "bootstrap");
    assert_eq!(read_manifest(&fixture), written_text);

    // An interrupted run: the ids never written, the cluster and a role never made. A
    // run then finds the rest by its tags, makes what is missing, writes the same ids.
    account
        .ecs
        .delete_cluster()
        .cluster(&name)
        .send()
        .await
        .unwrap();
    let task_role = format!("{name}-task");
    account
        .iam
        .delete_role()
        .role_name(&task_role)
        .send()
        .await
        .unwrap();
    std::fs::write(fixture.path("manifest.json"), &before).unwrap();
    bootstrap_run(&fixture, aws, &[])
        .succeeded()
        .says("network: exists: vpc-")
        .says("Redis: exists: ")
        .says("ECS cluster: created the cluster")
        .says(&format!("created {task_role}"));
    granted(&fixture, aws, "bootstrap");
    let resumed: Value = serde_json::from_str(&read_manifest(&fixture)).unwrap();
    assert_eq!(resumed["deploy"]["network"], written["deploy"]["network"]);
    assert_eq!(resumed["redis"], written["redis"]);
    assert_eq!(
        resumed["deploy"]["services"]["server"]["target_group_arn"],
        written["deploy"]["services"]["server"]["target_group_arn"]
    );

    // A deploy onto it.
    fixture
        .deploy(aws, &["--no-wait"])
        .succeeded()
        .says(&format!(
            "service {}: created with 2 tasks",
            fixture.server()
        ))
        .says("execution role: unchanged");
    granted(&fixture, aws, "deploy");

    // A key named after bootstrap: the deploy brings the execution role's policy up to
    // it (ECS could not decrypt the secrets otherwise, and the tasks would never start).
    let key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let mut keyed = resumed.clone();
    keyed["deploy"]["kms_key_arns"] = json!([key]);
    std::fs::write(
        fixture.path("manifest.json"),
        serde_json::to_string_pretty(&keyed).unwrap(),
    )
    .unwrap();
    fixture
        .deploy(aws, &["--no-wait"])
        .succeeded()
        .says("execution role: policy updated to the manifest's secrets");
    granted(&fixture, aws, "deploy");
    let policy = account
        .iam
        .get_role_policy()
        .role_name(format!("{name}-execution"))
        .policy_name("fjord-execution")
        .send()
        .await
        .unwrap();
    let policy: Value = serde_json::from_str(&fjord_deploy::bootstrap::percent_decode(
        policy.policy_document(),
    ))
    .unwrap();
    let statements = policy["Statement"].as_array().unwrap();
    let decrypt = statements
        .iter()
        .find(|s| s["Action"] == "kms:Decrypt")
        .unwrap();
    assert_eq!(decrypt["Resource"], json!([key]));
    let secret = resumed["deploy"]["secrets"]["FJORD_REDIS_PASSWORD"]
        .as_str()
        .unwrap();
    let read = statements
        .iter()
        .find(|s| s["Action"] == "secretsmanager:GetSecretValue")
        .unwrap();
    assert!(
        read["Resource"]
            .as_array()
            .unwrap()
            .contains(&json!(secret)),
        "{read}"
    );

    // Destroy: services, then everything bootstrap made, in order; nothing tagged is left.
    fixture
        .destroy(aws, &["--repositories", "--log-group", "--poll-secs", "1"])
        .succeeded()
        .says(&format!("service {}: removed", fixture.server()))
        .says("load balancer: deleted")
        .says("ElastiCache replication group: deleted")
        .says("NAT gateways: deleted 1 NAT gateway(s)")
        .says("VPC: deleted 1 VPC(s)");
    granted(&fixture, aws, "destroy");
    assert_eq!(account.tagged_resources(&name).await, Vec::<String>::new());
    assert!(aws.log_groups(&format!("/ecs/{name}")).await.is_empty());
    fixture
        .destroy(aws, &["--repositories", "--log-group"])
        .succeeded()
        .says(&format!(
            "Nothing left of {name} that fjord-deploy created and this run removes."
        ));
}

/// A certificate from moto's ACM for `domain` (the tests have no ACM client): its ARN.
async fn acm_certificate(endpoint: &str, domain: &str) -> String {
    let answer: Value = reqwest::Client::new()
        .post(format!("{endpoint}/"))
        .header("Content-Type", "application/x-amz-json-1.1")
        .header("X-Amz-Target", "CertificateManager.RequestCertificate")
        .header(
            "Authorization",
            format!("AWS4-HMAC-SHA256 Credential=testing/20250101/{REGION}/acm/aws4_request, SignedHeaders=host, Signature=0"),
        )
        .body(json!({ "DomainName": domain }).to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["CertificateArn"].as_str().unwrap().to_owned()
}

/// The HTTPS listener of the load balancer in front of `manifest`'s target group.
async fn https_listener(
    account: &Empty,
    manifest: &Value,
) -> aws_sdk_elasticloadbalancingv2::types::Listener {
    let target_group = manifest["deploy"]["services"]["server"]["target_group_arn"]
        .as_str()
        .unwrap();
    let groups = account
        .elb
        .describe_target_groups()
        .target_group_arns(target_group)
        .send()
        .await
        .unwrap();
    let balancer = groups.target_groups()[0].load_balancer_arns()[0].clone();
    let listeners = account
        .elb
        .describe_listeners()
        .load_balancer_arn(balancer)
        .send()
        .await
        .unwrap();
    listeners
        .listeners()
        .iter()
        .find(|l| l.port() == Some(443))
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_uses_your_own_vpc_and_redis_as_they_are() {
    let _one = EMULATOR.lock().await;
    let account = Empty::account().await;
    let aws = &account.aws;
    let ec2 = &account.ec2;
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.9.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
    let mut subnets = Vec::new();
    for (cidr, zone) in [
        ("10.9.1.0/24", "us-east-1a"),
        ("10.9.2.0/24", "us-east-1b"),
        ("10.9.11.0/24", "us-east-1a"),
        ("10.9.12.0/24", "us-east-1b"),
    ] {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(cidr)
            .availability_zone(zone)
            .send()
            .await
            .unwrap();
        subnets.push(subnet.subnet().unwrap().subnet_id().unwrap().to_owned());
    }
    let (public, private) = subnets.split_at(2);
    let name = unique("byo");
    let mut manifest = empty_account_manifest(&name);
    manifest["deploy"]["network"] = json!({ "subnets": private });
    let certificate = acm_certificate(
        &required_env("FJORD_TEST_AWS_ENDPOINT"),
        "streams.example.com",
    )
    .await;
    manifest["deploy"]["bootstrap"] = json!({
        "load_balancer_subnets": public,
        "certificate_arn": certificate,
        "redis": { "create": false }
    });
    manifest["redis"]["url"] = json!("rediss://my-redis.example.internal:6379");
    manifest["deploy"]["secrets"]["FJORD_REDIS_PASSWORD"] =
        json!("arn:aws:secretsmanager:us-east-1:123456789012:secret:mine/redis-AbCdEf");
    let fixture = Fixture {
        dir: tempfile::tempdir().unwrap(),
        name: name.clone(),
        cluster: name.clone(),
        manifest,
    };
    fixture.write_manifest();

    bootstrap_run(&fixture, aws, &[])
        .succeeded()
        .says(&format!("network: yours: {vpc}"))
        .says("Redis: yours: rediss://my-redis.example.internal:6379");
    let written: Value = serde_json::from_str(&read_manifest(&fixture)).unwrap();
    assert_eq!(written["deploy"]["network"]["subnets"], json!(private));
    // HTTPS with TLS 1.2 and 1.3 only, not the API's default policy that takes TLS 1.0;
    // a listener made with that default gets the policy on the next run.
    let https = https_listener(&account, &written).await;
    assert_eq!(
        https.ssl_policy(),
        Some("ELBSecurityPolicy-TLS13-1-2-2021-06")
    );
    account
        .elb
        .modify_listener()
        .listener_arn(https.listener_arn().unwrap())
        .ssl_policy("ELBSecurityPolicy-2016-08")
        .send()
        .await
        .unwrap();
    bootstrap_run(&fixture, aws, &[])
        .succeeded()
        .says("load balancer: ");
    granted(&fixture, aws, "bootstrap");
    assert_eq!(
        https_listener(&account, &written).await.ssl_policy(),
        Some("ELBSecurityPolicy-TLS13-1-2-2021-06")
    );
    assert_eq!(
        written["redis"]["url"],
        "rediss://my-redis.example.internal:6379"
    );
    assert_eq!(
        written["redis"]["username"], "fjord",
        "your Redis's user stays"
    );
    // Nothing of the network made, no Redis; the security groups go into your VPC.
    let vpcs = ec2
        .describe_vpcs()
        .filters(Empty::tagged(&name))
        .send()
        .await
        .unwrap();
    assert!(vpcs.vpcs().is_empty());
    let redis = account
        .elasticache
        .describe_replication_groups()
        .send()
        .await
        .unwrap();
    assert!(redis.replication_groups().is_empty());
    let groups = ec2
        .describe_security_groups()
        .filters(Empty::tagged(&name))
        .send()
        .await
        .unwrap();
    assert_eq!(
        groups.security_groups().len(),
        2,
        "load balancer and tasks, no Redis"
    );
    assert!(
        groups
            .security_groups()
            .iter()
            .all(|g| g.vpc_id() == Some(vpc.as_str()))
    );

    fixture
        .destroy(aws, &["--log-group", "--poll-secs", "1"])
        .succeeded();
    granted(&fixture, aws, "destroy");
    assert_eq!(account.tagged_resources(&name).await, Vec::<String>::new());
    // Yours stays.
    let left = ec2
        .describe_subnets()
        .subnet_ids(&subnets[0])
        .send()
        .await
        .unwrap();
    assert_eq!(left.subnets().len(), 1);
    assert_eq!(
        ec2.describe_vpcs()
            .vpc_ids(&vpc)
            .send()
            .await
            .unwrap()
            .vpcs()
            .len(),
        1
    );
}

/// Names bootstrap would give its own, taken by what fjord-deploy did not make for this
/// deployment (a target group tagged for another, a role without the tag): bootstrap
/// refuses them before any change, and destroy leaves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_another_took_are_refused_by_bootstrap_and_spared_by_destroy() {
    let _one = EMULATOR.lock().await;
    let account = Empty::account().await;
    let aws = &account.aws;
    let name = unique("taken");
    let vpc = account
        .ec2
        .create_vpc()
        .cidr_block("10.8.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
    let group = ip_target_group(&account.elb, &format!("{name}-server"), &vpc).await;
    account
        .elb
        .add_tags()
        .resource_arns(&group)
        .tags(
            aws_sdk_elasticloadbalancingv2::types::Tag::builder()
                .key("fjord:deployment")
                .value("someone-else")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let role = format!("{name}-execution");
    account
        .iam
        .create_role()
        .role_name(&role)
        .assume_role_policy_document(r#"{"Version":"2012-10-17","Statement":[]}"#)
        .send()
        .await
        .unwrap();
    let fixture = empty_account_fixture(&name);
    let before = read_manifest(&fixture);

    bootstrap_run(&fixture, aws, &["--dry-run"])
        .failed()
        .says(&format!(
            "target group {name}-server: exists but was not created by fjord-deploy"
        ))
        .says("(nothing was changed)");
    assert_eq!(read_manifest(&fixture), before);

    fixture
        .destroy(aws, &["--poll-secs", "1"])
        .succeeded()
        .says(&format!(
            "Nothing left of {name} that fjord-deploy created and this run removes."
        ));
    let groups = account
        .elb
        .describe_target_groups()
        .target_group_arns(&group)
        .send()
        .await
        .unwrap();
    assert_eq!(groups.target_groups().len(), 1);
    account
        .iam
        .get_role()
        .role_name(&role)
        .send()
        .await
        .unwrap();
}
