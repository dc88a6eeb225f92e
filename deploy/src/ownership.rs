//! What is a deployment's own. Everything fjord-deploy makes carries the tag
//! `fjord:deployment = <name>`, and every part that finds what it made goes through here:
//! one [`Named`] per AWS resource kind says how to find one by its name and read its tags,
//! and [`lookup`] judges it [`Owned::Ours`] or [`Owned::Theirs`]. Bootstrap uses what is
//! its own and refuses a name another made ([`Owned::usable`]: the manifest names what is
//! yours to use); destroy and teardown remove only what is their own ([`Owned::ours`]).
//!
//! EC2 resources, whose names are only `Name` tags, are found by both tags at once: there
//! another's resource of the same name is no conflict, only not found. Services and task
//! definitions are listed rather than named, and judged by [`deployed_by`].

use aws_sdk_cloudwatchlogs::types::LogGroup;
use aws_sdk_ec2::types::{
    Address, Filter, InternetGateway, NatGateway, RouteTable, SecurityGroup, Subnet, Vpc,
};
use aws_sdk_ecr::types::Repository;
use aws_sdk_ecs::types::Cluster;
use aws_sdk_elasticache::types::{CacheSubnetGroup, ReplicationGroup};
use aws_sdk_elasticloadbalancingv2::types::{LoadBalancer, TargetGroup};
use aws_sdk_iam::types::Role;
use aws_sdk_secretsmanager::operation::describe_secret::DescribeSecretOutput;

use crate::clients::Clients;
use crate::error::{DeployError, none_if};
use crate::plan::{DEPLOYMENT_TAG, FINGERPRINT_TAG};

/// A resource looked up by its name.
#[derive(Debug, Clone)]
pub(crate) enum Owned<T> {
    /// There is none.
    Absent,
    /// There is one, tagged as this deployment's.
    Ours(T),
    /// There is one that fjord-deploy did not make for this deployment: the resource, as
    /// errors name it.
    Theirs(String),
}

impl<T> Owned<T> {
    /// What bootstrap may use: its own, or nothing; another's is refused.
    pub(crate) fn usable(self) -> Result<Option<T>, DeployError> {
        match self {
            Self::Absent => Ok(None),
            Self::Ours(value) => Ok(Some(value)),
            Self::Theirs(resource) => Err(not_ours(&resource)),
        }
    }

    /// Only what the deployment owns (what destroy removes).
    pub(crate) fn ours(self) -> Option<T> {
        match self {
            Self::Ours(value) => Some(value),
            _ => None,
        }
    }
}

/// Why bootstrap refuses a resource of the name it would give its own.
pub(crate) fn not_ours(resource: &str) -> DeployError {
    DeployError::Precondition {
        resource: resource.to_owned(),
        message: format!(
            "exists but was not created by fjord-deploy (no {DEPLOYMENT_TAG} tag for this deployment): name it in the manifest to use it as it is, or choose another $.deploy.name"
        ),
    }
}

/// Whether `tags` say the resource was made for `deployment`.
fn tagged_for<'a>(deployment: &str, tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
    tags.into_iter()
        .any(|(key, value)| key == DEPLOYMENT_TAG && value == deployment)
}

/// Whether a service or task definition of `deployment` carrying `tags` was made by a
/// deploy of it: one made before the deployment tag existed is known by the fingerprint
/// only a deploy sets.
pub(crate) fn deployed_by<'a>(
    deployment: &str,
    tags: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> bool {
    let tags: Vec<(&str, &str)> = tags.into_iter().collect();
    match tags.iter().find(|(key, _)| *key == DEPLOYMENT_TAG) {
        Some((_, value)) => *value == deployment,
        None => tags.iter().any(|(key, _)| *key == FINGERPRINT_TAG),
    }
}

/// A kind of AWS resource that fjord-deploy names, and finds again by that name.
pub(crate) trait Named: Sized {
    /// How errors name the kind: `target group`.
    const KIND: &'static str;

    /// The resource `name` (of `deployment`, for kinds found by tag), if there is one.
    async fn find_by_name(
        aws: &Clients,
        deployment: &str,
        name: &str,
    ) -> Result<Option<Self>, DeployError>;

    /// Its tags, key and value (a call of their own where the description has none).
    async fn tags(&self, aws: &Clients) -> Result<Vec<(String, String)>, DeployError>;

    /// The resource `name` of this kind, as errors name it.
    fn resource(name: &str) -> String {
        format!("{} {name}", Self::KIND)
    }
}

/// The resource `name` of kind `K`, judged by its tags: `deployment`'s, another's, or none.
pub(crate) async fn lookup<K: Named>(
    aws: &Clients,
    deployment: &str,
    name: &str,
) -> Result<Owned<K>, DeployError> {
    let Some(found) = K::find_by_name(aws, deployment, name).await? else {
        return Ok(Owned::Absent);
    };
    let tags = found.tags(aws).await?;
    Ok(
        if tagged_for(
            deployment,
            tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ) {
            Owned::Ours(found)
        } else {
            Owned::Theirs(K::resource(name))
        },
    )
}

/// Owned key/value pairs of tags whose key and value the SDK may leave out.
fn pairs<'a>(
    tags: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>)>,
) -> Vec<(String, String)> {
    tags.into_iter()
        .filter_map(|(k, v)| Some((k?.to_owned(), v.unwrap_or_default().to_owned())))
        .collect()
}

// ------------------------------------------------------------------ load balancing

/// The tags of a load balancer or target group.
async fn elb_tags(
    aws: &Clients,
    arn: &str,
    resource: &str,
) -> Result<Vec<(String, String)>, DeployError> {
    let described = aws
        .elb
        .describe_tags()
        .resource_arns(arn)
        .send()
        .await
        .map_err(|e| DeployError::aws(resource, "elasticloadbalancing:DescribeTags", &e))?;
    Ok(pairs(
        described
            .tag_descriptions()
            .iter()
            .flat_map(|d| d.tags())
            .map(|t| (t.key(), t.value())),
    ))
}

impl Named for TargetGroup {
    const KIND: &'static str = "target group";

    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        let found = none_if(
            aws.elb.describe_target_groups().names(name).send().await,
            |e| e.is_target_group_not_found_exception(),
            &Self::resource(name),
            "elasticloadbalancing:DescribeTargetGroups",
        )?;
        Ok(found.and_then(|found| found.target_groups().first().cloned()))
    }

    async fn tags(&self, aws: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        let arn = self.target_group_arn().unwrap_or_default();
        elb_tags(
            aws,
            arn,
            &Self::resource(self.target_group_name().unwrap_or(arn)),
        )
        .await
    }
}

impl Named for LoadBalancer {
    const KIND: &'static str = "load balancer";

    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        let found = none_if(
            aws.elb.describe_load_balancers().names(name).send().await,
            |e| e.is_load_balancer_not_found_exception(),
            &Self::resource(name),
            "elasticloadbalancing:DescribeLoadBalancers",
        )?;
        Ok(found.and_then(|found| found.load_balancers().first().cloned()))
    }

    async fn tags(&self, aws: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        let arn = self.load_balancer_arn().unwrap_or_default();
        let name = self.load_balancer_name().unwrap_or(arn);
        elb_tags(aws, arn, &Self::resource(name)).await
    }
}

// ------------------------------------------------------------------------ ElastiCache

/// The tags of an ElastiCache resource.
async fn cache_tags(
    aws: &Clients,
    arn: &str,
    resource: &str,
) -> Result<Vec<(String, String)>, DeployError> {
    let tags = aws
        .elasticache
        .list_tags_for_resource()
        .resource_name(arn)
        .send()
        .await
        .map_err(|e| DeployError::aws(resource, "elasticache:ListTagsForResource", &e))?;
    Ok(pairs(tags.tag_list().iter().map(|t| (t.key(), t.value()))))
}

impl Named for ReplicationGroup {
    const KIND: &'static str = "ElastiCache replication group";

    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        describe_replication_group(aws, name, &Self::resource(name)).await
    }

    async fn tags(&self, aws: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        let id = self.replication_group_id().unwrap_or_default();
        cache_tags(aws, self.arn().unwrap_or_default(), &Self::resource(id)).await
    }
}

/// The replication group `id` as ElastiCache describes it; `None` where there is none.
pub(crate) async fn describe_replication_group(
    aws: &Clients,
    id: &str,
    resource: &str,
) -> Result<Option<ReplicationGroup>, DeployError> {
    let found = none_if(
        aws.elasticache
            .describe_replication_groups()
            .replication_group_id(id)
            .send()
            .await,
        |e| e.is_replication_group_not_found_fault(),
        resource,
        "elasticache:DescribeReplicationGroups",
    )?;
    Ok(found.and_then(|found| found.replication_groups().first().cloned()))
}

impl Named for CacheSubnetGroup {
    const KIND: &'static str = "cache subnet group";

    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        let found = none_if(
            aws.elasticache
                .describe_cache_subnet_groups()
                .cache_subnet_group_name(name)
                .send()
                .await,
            |e| e.is_cache_subnet_group_not_found_fault(),
            &Self::resource(name),
            "elasticache:DescribeCacheSubnetGroups",
        )?;
        Ok(found.and_then(|found| found.cache_subnet_groups().first().cloned()))
    }

    async fn tags(&self, aws: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        let name = self.cache_subnet_group_name().unwrap_or_default();
        cache_tags(aws, self.arn().unwrap_or_default(), &Self::resource(name)).await
    }
}

// ------------------------------------------------------------- what carries its tags

impl Named for DescribeSecretOutput {
    const KIND: &'static str = "secret";

    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        none_if(
            aws.secrets.describe_secret().secret_id(name).send().await,
            |e| e.is_resource_not_found_exception(),
            &Self::resource(name),
            "secretsmanager:DescribeSecret",
        )
    }

    async fn tags(&self, _: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        Ok(pairs(self.tags().iter().map(|t| (t.key(), t.value()))))
    }
}

impl Named for Cluster {
    const KIND: &'static str = "ECS cluster";

    /// The active cluster `name` (a deleted one stays listed as `INACTIVE`).
    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        let found = aws
            .ecs
            .describe_clusters()
            .clusters(name)
            .include(aws_sdk_ecs::types::ClusterField::Tags)
            .send()
            .await
            .map_err(|e| DeployError::aws(Self::resource(name), "ecs:DescribeClusters", &e))?;
        Ok(found
            .clusters()
            .iter()
            .find(|c| c.status() == Some("ACTIVE"))
            .cloned())
    }

    async fn tags(&self, _: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        Ok(pairs(self.tags().iter().map(|t| (t.key(), t.value()))))
    }
}

impl Named for Role {
    const KIND: &'static str = "IAM role";

    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        let found = none_if(
            aws.iam.get_role().role_name(name).send().await,
            |e| e.is_no_such_entity_exception(),
            &Self::resource(name),
            "iam:GetRole",
        )?;
        Ok(found.and_then(|found| found.role().cloned()))
    }

    async fn tags(&self, _: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        Ok(pairs(
            self.tags().iter().map(|t| (Some(t.key()), Some(t.value()))),
        ))
    }
}

// ------------------------------------------------------------- what a deploy makes

impl Named for LogGroup {
    const KIND: &'static str = "log group";

    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        let found = aws
            .logs
            .describe_log_groups()
            .log_group_name_prefix(name)
            .send()
            .await
            .map_err(|e| DeployError::aws(Self::resource(name), "logs:DescribeLogGroups", &e))?;
        Ok(found
            .log_groups()
            .iter()
            .find(|g| g.log_group_name() == Some(name))
            .cloned())
    }

    async fn tags(&self, aws: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        let resource = Self::resource(self.log_group_name().unwrap_or_default());
        let tags = aws
            .logs
            .list_tags_for_resource()
            .resource_arn(self.log_group_arn().unwrap_or_default())
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "logs:ListTagsForResource", &e))?;
        Ok(tags
            .tags()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl Named for Repository {
    const KIND: &'static str = "ECR repository";

    async fn find_by_name(aws: &Clients, _: &str, name: &str) -> Result<Option<Self>, DeployError> {
        let found = none_if(
            aws.ecr
                .describe_repositories()
                .repository_names(name)
                .send()
                .await,
            |e| e.is_repository_not_found_exception(),
            &Self::resource(name),
            "ecr:DescribeRepositories",
        )?;
        Ok(found.and_then(|found| found.repositories().first().cloned()))
    }

    async fn tags(&self, aws: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        let resource = Self::resource(self.repository_name().unwrap_or_default());
        let tags = aws
            .ecr
            .list_tags_for_resource()
            .resource_arn(self.repository_arn().unwrap_or_default())
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "ecr:ListTagsForResource", &e))?;
        Ok(pairs(
            tags.tags().iter().map(|t| (Some(t.key()), Some(t.value()))),
        ))
    }
}

// ------------------------------------------------------------------------------- EC2

/// An EC2 resource kind: its name is its `Name` tag, and its tags are in its description.
pub(crate) trait Ec2: Sized {
    /// How errors name the kind.
    const LABEL: &'static str;

    /// Every one that `filters` match; `resource` names them in errors.
    async fn describe(
        aws: &Clients,
        filters: Vec<Filter>,
        resource: &str,
    ) -> Result<Vec<Self>, DeployError>;

    /// Its tags, as EC2 describes them.
    fn ec2_tags(&self) -> &[aws_sdk_ec2::types::Tag];

    /// What one found by name must also match to be of use.
    fn usable() -> Option<Filter> {
        None
    }
}

impl<K: Ec2> Named for K {
    const KIND: &'static str = K::LABEL;

    /// Found by both tags: another's of the same name is no conflict.
    async fn find_by_name(
        aws: &Clients,
        deployment: &str,
        name: &str,
    ) -> Result<Option<Self>, DeployError> {
        let mut filters = vec![
            tagged(deployment),
            Filter::builder().name("tag:Name").values(name).build(),
        ];
        filters.extend(K::usable());
        let found = K::describe(aws, filters, &Self::resource(name)).await?;
        Ok(found.into_iter().next())
    }

    async fn tags(&self, _: &Clients) -> Result<Vec<(String, String)>, DeployError> {
        Ok(pairs(self.ec2_tags().iter().map(|t| (t.key(), t.value()))))
    }
}

/// The filter that finds every EC2 resource of a deployment.
fn tagged(deployment: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{DEPLOYMENT_TAG}"))
        .values(deployment)
        .build()
}

/// Every EC2 resource of kind `K` tagged for `deployment` that `also` matches.
pub(crate) async fn all_tagged<K: Ec2>(
    aws: &Clients,
    deployment: &str,
    also: Option<Filter>,
) -> Result<Vec<K>, DeployError> {
    let resource = format!("EC2 resources tagged for {deployment}");
    let filters = std::iter::once(tagged(deployment)).chain(also).collect();
    K::describe(aws, filters, &resource).await
}

/// [`Ec2`] for a kind whose describe call is `$describe`, its filters set by `$set`, its
/// list read by `$list`; `$own` are the items it does not take from the trait.
macro_rules! ec2_kind {
    ($kind:ty, $label:literal, $operation:literal, $describe:ident, $set:ident, $list:ident $(, $($own:tt)*)?) => {
        impl Ec2 for $kind {
            const LABEL: &'static str = $label;

            async fn describe(
                aws: &Clients,
                filters: Vec<Filter>,
                resource: &str,
            ) -> Result<Vec<Self>, DeployError> {
                let found = aws
                    .ec2
                    .$describe()
                    .$set(Some(filters))
                    .send()
                    .await
                    .map_err(|e| DeployError::aws(resource, $operation, &e))?;
                Ok(found.$list().to_vec())
            }

            fn ec2_tags(&self) -> &[aws_sdk_ec2::types::Tag] {
                self.tags()
            }

            $($($own)*)?
        }
    };
}

ec2_kind!(
    Vpc,
    "VPC",
    "ec2:DescribeVpcs",
    describe_vpcs,
    set_filters,
    vpcs
);
ec2_kind!(
    Subnet,
    "subnet",
    "ec2:DescribeSubnets",
    describe_subnets,
    set_filters,
    subnets
);
ec2_kind!(
    InternetGateway,
    "internet gateway",
    "ec2:DescribeInternetGateways",
    describe_internet_gateways,
    set_filters,
    internet_gateways
);
ec2_kind!(
    RouteTable,
    "route table",
    "ec2:DescribeRouteTables",
    describe_route_tables,
    set_filters,
    route_tables
);
ec2_kind!(
    SecurityGroup,
    "security group",
    "ec2:DescribeSecurityGroups",
    describe_security_groups,
    set_filters,
    security_groups
);
// The Elastic IP of a NAT gateway bears the gateway's name.
ec2_kind!(
    Address,
    "Elastic IP",
    "ec2:DescribeAddresses",
    describe_addresses,
    set_filters,
    addresses
);

ec2_kind!(
    NatGateway,
    "NAT gateway",
    "ec2:DescribeNatGateways",
    describe_nat_gateways,
    set_filter,
    nat_gateways,
    /// A deleted NAT gateway stays listed for a while, and a failed one is of no use.
    fn usable() -> Option<Filter> {
        Some(nat_states(&["pending", "available"]))
    }
);

/// The filter of NAT gateways in one of `states`.
pub(crate) fn nat_states(states: &[&str]) -> Filter {
    let filter = Filter::builder().name("state");
    states.iter().fold(filter, |f, s| f.values(*s)).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_decided_by_tags() {
        assert!(deployed_by("fjord", [(DEPLOYMENT_TAG, "fjord")]));
        assert!(!deployed_by("fjord", [(DEPLOYMENT_TAG, "other")]));
        // Made before the deployment tag existed: the fingerprint only a deploy sets.
        assert!(deployed_by("fjord", [(FINGERPRINT_TAG, "sha256:aa")]));
        assert!(!deployed_by(
            "fjord",
            [(FINGERPRINT_TAG, "sha256:aa"), (DEPLOYMENT_TAG, "other")]
        ));
        assert!(!deployed_by("fjord", [("team", "data")]));
        // What lookup judges goes by the deployment tag only: the fingerprint was never
        // put on what is found by name.
        assert!(!tagged_for("fjord", [(FINGERPRINT_TAG, "x")]));
        assert!(tagged_for(
            "fjord",
            [("team", "data"), (DEPLOYMENT_TAG, "fjord")]
        ));
        assert!(!tagged_for("fjord", [(DEPLOYMENT_TAG, "other")]));
    }
}
