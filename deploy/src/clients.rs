//! The AWS clients of one region, made once per run (pointed at an emulator when asked)
//! and handed to every part that calls AWS.

use aws_config::{BehaviorVersion, Region};

/// The AWS clients of one region.
#[derive(Debug)]
pub(crate) struct Clients {
    pub(crate) ecr: aws_sdk_ecr::Client,
    pub(crate) ecs: aws_sdk_ecs::Client,
    pub(crate) scaling: aws_sdk_applicationautoscaling::Client,
    pub(crate) logs: aws_sdk_cloudwatchlogs::Client,
    pub(crate) elb: aws_sdk_elasticloadbalancingv2::Client,
    pub(crate) ec2: aws_sdk_ec2::Client,
    pub(crate) elasticache: aws_sdk_elasticache::Client,
    pub(crate) iam: aws_sdk_iam::Client,
    pub(crate) secrets: aws_sdk_secretsmanager::Client,
}

impl Clients {
    pub(crate) async fn connect(region: &str, endpoint_url: Option<&str>) -> Self {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.to_owned()));
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        Self {
            ecr: aws_sdk_ecr::Client::new(&config),
            ecs: aws_sdk_ecs::Client::new(&config),
            scaling: aws_sdk_applicationautoscaling::Client::new(&config),
            logs: aws_sdk_cloudwatchlogs::Client::new(&config),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&config),
            ec2: aws_sdk_ec2::Client::new(&config),
            elasticache: aws_sdk_elasticache::Client::new(&config),
            iam: aws_sdk_iam::Client::new(&config),
            secrets: aws_sdk_secretsmanager::Client::new(&config),
        }
    }
}
