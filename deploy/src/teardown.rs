//! Removes what `bootstrap` created, after `destroy` has removed the services: the load
//! balancer and its target group, ElastiCache with its subnet group and AUTH token secret,
//! the ECS cluster, the roles, then the network from the NAT gateways down to the VPC.
//! Only what carries the deployment's tag is touched (a VPC of your own stays; the
//! security groups bootstrap put in it go). Each deletion is waited on before what
//! depends on it goes: the load balancer, ElastiCache and the NAT gateways take minutes,
//! and network interfaces linger after them, which EC2 reports as a dependency violation
//! that is waited out. A second run finds nothing and does nothing.

use std::future::Future;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Address, Filter, InternetGateway, NatGateway, RouteTable, SecurityGroup, Subnet, Vpc,
};
use aws_sdk_ecs::types::Cluster;
use aws_sdk_elasticache::types::{CacheSubnetGroup, ReplicationGroup};
use aws_sdk_elasticloadbalancingv2::types::{LoadBalancer, TargetGroup};
use aws_sdk_iam::types::Role;
use aws_sdk_secretsmanager::operation::describe_secret::DescribeSecretOutput;

use crate::bootstrap::{self, Names};
use crate::clients::Clients;
use crate::error::{DeployError, none_if};
use crate::output::{Ledger, Outcome};
use crate::ownership::{Ec2, Named, all_tagged, describe_replication_group, lookup, nat_states};
use crate::wait;

/// What bootstrap created for a deployment, as found by name and tag.
#[derive(Debug, Default)]
pub(crate) struct Infrastructure {
    load_balancer: Option<String>,
    target_group: Option<String>,
    redis: Option<String>,
    subnet_group: Option<String>,
    secret: Option<String>,
    cluster: Option<String>,
    roles: Vec<String>,
    nat_gateways: Vec<String>,
    addresses: Vec<String>,
    /// Id and `Name` tag.
    security_groups: Vec<(String, String)>,
    subnets: Vec<String>,
    /// Id and its subnet associations.
    route_tables: Vec<(String, Vec<String>)>,
    /// Id and the VPCs it is attached to.
    gateways: Vec<(String, Vec<String>)>,
    vpcs: Vec<String>,
}

/// How a teardown runs.
pub(crate) struct Removal<'a> {
    pub(crate) aws: &'a Clients,
    pub(crate) name: &'a str,
    pub(crate) dry_run: bool,
    pub(crate) timeout: std::time::Duration,
    pub(crate) poll: std::time::Duration,
}

impl Removal<'_> {
    /// Runs one deletion as a ledger step, labelled `label`, its outcome naming `what`;
    /// in a dry run `work` is not run, only said.
    async fn step(
        &self,
        ledger: &mut Ledger,
        label: &str,
        what: &str,
        work: impl Future<Output = Result<(), DeployError>>,
    ) -> Result<(), DeployError> {
        let dry = self.dry_run;
        ledger
            .run(
                label.to_owned(),
                Box::pin(async {
                    if dry {
                        return Ok(((), format!("would delete {what}")));
                    }
                    work.await?;
                    Ok(((), format!("deleted {what}")))
                }),
            )
            .await
    }

    /// Runs the deletion of each of `items` (by `delete`) as one ledger step, labelled
    /// `label`, its outcome counting them as `what`; nothing where there are none.
    async fn each<'i, T, F, Fut>(
        &self,
        ledger: &mut Ledger,
        label: &str,
        what: &str,
        items: &'i [T],
        mut delete: F,
    ) -> Result<(), DeployError>
    where
        F: FnMut(&'i T) -> Fut,
        Fut: Future<Output = Result<(), DeployError>>,
    {
        if items.is_empty() {
            return Ok(());
        }
        let work = async {
            for item in items {
                delete(item).await?;
            }
            Ok(())
        };
        let what = format!("{} {what}", items.len());
        self.step(ledger, label, &what, work).await
    }

    /// Waits, within the removal's timeout, until `look` finds `resource` gone (`None`).
    async fn until_gone<F, Fut>(&self, resource: &str, look: F) -> Result<(), DeployError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<String>, DeployError>>,
    {
        wait::until(resource, self.timeout, self.poll, look)
            .await
            .map(drop)
    }

    /// The resource `name` of kind `K`, if it is the deployment's.
    async fn ours<K: Named>(&self, name: &str) -> Result<Option<K>, DeployError> {
        Ok(lookup::<K>(self.aws, self.name, name).await?.ours())
    }

    /// Finds what bootstrap created for the deployment; `cluster` is the cluster's name.
    pub(crate) async fn find(&self, cluster: &str) -> Result<Infrastructure, DeployError> {
        let names = Names::of(self.name);
        let arn = |arn: Option<&str>| arn.unwrap_or_default().to_owned();
        let balancer = self.ours::<LoadBalancer>(&names.load_balancer).await?;
        let group = self.ours::<TargetGroup>(&names.target_group).await?;
        let secret = self.ours::<DescribeSecretOutput>(&names.secret).await?;
        let mut found = Infrastructure {
            load_balancer: balancer.map(|b| arn(b.load_balancer_arn())),
            target_group: group.map(|g| arn(g.target_group_arn())),
            redis: (self.ours::<ReplicationGroup>(&names.redis).await?)
                .map(|_| names.redis.clone()),
            subnet_group: (self.ours::<CacheSubnetGroup>(&names.redis).await?)
                .map(|_| names.redis.clone()),
            secret: secret.map(|s| arn(s.arn())),
            cluster: (self.ours::<Cluster>(cluster).await?).map(|_| cluster.to_owned()),
            ..Infrastructure::default()
        };
        for role in [&names.execution_role, &names.task_role] {
            if self.ours::<Role>(role).await?.is_some() {
                found.roles.push(role.clone());
            }
        }
        self.find_network(&mut found).await?;
        Ok(found)
    }

    /// Every EC2 resource of kind `K` tagged for the deployment that `also` matches.
    async fn all<K: Ec2>(&self, also: Option<Filter>) -> Result<Vec<K>, DeployError> {
        all_tagged(self.aws, self.name, also).await
    }

    async fn find_network(&self, found: &mut Infrastructure) -> Result<(), DeployError> {
        let ids = |id: Option<&str>| id.map(str::to_owned);
        let nats = self.all::<NatGateway>(Some(nat_states(&[
            "pending",
            "available",
            "deleting",
            "failed",
        ])));
        found.nat_gateways = (nats.await?.iter())
            .filter_map(|n| ids(n.nat_gateway_id()))
            .collect();
        found.addresses = (self.all::<Address>(None).await?.iter())
            .filter_map(|a| ids(a.allocation_id()))
            .collect();
        found.security_groups = (self.all::<SecurityGroup>(None).await?.iter())
            .filter_map(|g| {
                let name = g
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some("Name"))
                    .and_then(|t| t.value())
                    .unwrap_or_default();
                Some((g.group_id()?.to_owned(), name.to_owned()))
            })
            .collect();
        // A group that others' rules name cannot go before them: Redis's names the
        // tasks', the tasks' names the load balancer's.
        found.security_groups.sort_by_key(|(_, name)| {
            ["-redis", "-tasks", "-lb"]
                .iter()
                .position(|suffix| name.ends_with(suffix))
                .unwrap_or(usize::MAX)
        });
        found.subnets = (self.all::<Subnet>(None).await?.iter())
            .filter_map(|s| ids(s.subnet_id()))
            .collect();
        found.route_tables = (self.all::<RouteTable>(None).await?.iter())
            .filter_map(|t| {
                let associations = t
                    .associations()
                    .iter()
                    .filter(|a| a.main() != Some(true))
                    .filter_map(|a| ids(a.route_table_association_id()))
                    .collect();
                Some((t.route_table_id()?.to_owned(), associations))
            })
            .collect();
        found.gateways = (self.all::<InternetGateway>(None).await?.iter())
            .filter_map(|g| {
                let vpcs = g
                    .attachments()
                    .iter()
                    .filter_map(|a| ids(a.vpc_id()))
                    .collect();
                Some((g.internet_gateway_id()?.to_owned(), vpcs))
            })
            .collect();
        found.vpcs = (self.all::<Vpc>(None).await?.iter())
            .filter_map(|v| ids(v.vpc_id()))
            .collect();
        Ok(())
    }
}

impl Infrastructure {
    /// The steps of its removal, in order, for the report of what was not done.
    pub(crate) fn labels(&self) -> Vec<String> {
        let mut labels = Vec::new();
        let mut add = |present: bool, label: String| {
            if present {
                labels.push(label);
            }
        };
        add(self.load_balancer.is_some(), "load balancer".into());
        add(self.target_group.is_some(), "target group".into());
        add(self.redis.is_some(), "ElastiCache replication group".into());
        add(self.subnet_group.is_some(), "cache subnet group".into());
        add(self.secret.is_some(), "Redis AUTH token secret".into());
        add(self.cluster.is_some(), "ECS cluster".into());
        for role in &self.roles {
            labels.push(format!("IAM role {role}"));
        }
        let mut add = |items: usize, label: &str| {
            if items > 0 {
                labels.push(label.to_owned());
            }
        };
        add(self.nat_gateways.len(), "NAT gateways");
        add(self.addresses.len(), "Elastic IPs");
        add(self.security_groups.len(), "security groups");
        add(self.route_tables.len(), "route tables");
        add(self.subnets.len(), "subnets");
        add(self.gateways.len(), "internet gateway");
        add(self.vpcs.len(), "VPC");
        labels
    }

    /// Removes it all, in dependency order, each deletion waited on.
    pub(crate) async fn remove(
        &self,
        removal: &Removal<'_>,
        ledger: &mut Ledger,
    ) -> Result<(), DeployError> {
        let aws = removal.aws;
        if let Some(arn) = &self.load_balancer {
            let resource = &format!("load balancer {arn}");
            let work = async {
                aws.elb
                    .delete_load_balancer()
                    .load_balancer_arn(arn)
                    .send()
                    .await
                    .map_err(|e| {
                        DeployError::aws(resource, "elasticloadbalancing:DeleteLoadBalancer", &e)
                    })?;
                removal
                    .until_gone(resource, move || async move {
                        let found = bootstrap::describe_load_balancer(aws, arn, resource).await?;
                        Ok(found.map(|_| "deleting".to_owned()))
                    })
                    .await
            };
            removal.step(ledger, "load balancer", arn, work).await?;
        }
        if let Some(arn) = &self.target_group {
            let work = async {
                aws.elb
                    .delete_target_group()
                    .target_group_arn(arn)
                    .send()
                    .await
                    .map_err(|e| {
                        DeployError::aws(
                            format!("target group {arn}"),
                            "elasticloadbalancing:DeleteTargetGroup",
                            &e,
                        )
                    })?;
                Ok(())
            };
            removal.step(ledger, "target group", arn, work).await?;
        }
        if let Some(id) = &self.redis {
            let resource = &format!("ElastiCache replication group {id}");
            let work = async {
                // Already being deleted by an earlier run (an invalid state): only waited on.
                none_if(
                    aws.elasticache
                        .delete_replication_group()
                        .replication_group_id(id)
                        .send()
                        .await,
                    |e| e.is_invalid_replication_group_state_fault(),
                    resource,
                    "elasticache:DeleteReplicationGroup",
                )?;
                removal
                    .until_gone(resource, move || async move {
                        let found = describe_replication_group(aws, id, resource).await?;
                        Ok(found.map(|g| g.status().unwrap_or("deleting").to_owned()))
                    })
                    .await
            };
            removal
                .step(ledger, "ElastiCache replication group", id, work)
                .await?;
        }
        if let Some(name) = &self.subnet_group {
            let work = async {
                aws.elasticache
                    .delete_cache_subnet_group()
                    .cache_subnet_group_name(name)
                    .send()
                    .await
                    .map_err(|e| {
                        DeployError::aws(
                            format!("cache subnet group {name}"),
                            "elasticache:DeleteCacheSubnetGroup",
                            &e,
                        )
                    })?;
                Ok(())
            };
            removal
                .step(ledger, "cache subnet group", name, work)
                .await?;
        }
        if let Some(arn) = &self.secret {
            let work = async {
                // Without the recovery window, so that a bootstrap of the same name can
                // run again at once.
                aws.secrets
                    .delete_secret()
                    .secret_id(arn)
                    .force_delete_without_recovery(true)
                    .send()
                    .await
                    .map_err(|e| {
                        DeployError::aws(format!("secret {arn}"), "secretsmanager:DeleteSecret", &e)
                    })?;
                Ok(())
            };
            removal
                .step(ledger, "Redis AUTH token secret", arn, work)
                .await?;
        }
        if let Some(cluster) = &self.cluster {
            let work = async {
                aws.ecs
                    .delete_cluster()
                    .cluster(cluster)
                    .send()
                    .await
                    .map_err(|e| {
                        DeployError::aws(format!("ECS cluster {cluster}"), "ecs:DeleteCluster", &e)
                    })?;
                Ok(())
            };
            removal.step(ledger, "ECS cluster", cluster, work).await?;
        }
        for role in &self.roles {
            ledger
                .run(
                    format!("IAM role {role}"),
                    Box::pin(remove_role(aws, role, removal.dry_run)),
                )
                .await?;
        }
        Box::pin(self.remove_network(removal, ledger)).await
    }

    async fn remove_network(
        &self,
        removal: &Removal<'_>,
        ledger: &mut Ledger,
    ) -> Result<(), DeployError> {
        let ec2 = &removal.aws.ec2;
        // Each kind goes as one step: its label, and how many went. NAT gateways are all
        // deleted before any is waited on, since each takes minutes.
        if !self.nat_gateways.is_empty() {
            let work = async {
                for id in &self.nat_gateways {
                    let resource = format!("NAT gateway {id}");
                    ec2.delete_nat_gateway()
                        .nat_gateway_id(id)
                        .send()
                        .await
                        .map_err(|e| DeployError::aws(&resource, "ec2:DeleteNatGateway", &e))?;
                }
                for id in &self.nat_gateways {
                    let resource = &format!("NAT gateway {id}");
                    removal
                        .until_gone(resource, move || async move {
                            let nat =
                                bootstrap::describe_nat_gateway(removal.aws, id, resource).await?;
                            Ok(
                                match nat.as_ref().and_then(|n| n.state()).map(|s| s.as_str()) {
                                    None | Some("deleted") => None,
                                    Some(state) => Some(state.to_owned()),
                                },
                            )
                        })
                        .await?;
                }
                Ok(())
            };
            let what = format!("{} NAT gateway(s)", self.nat_gateways.len());
            removal.step(ledger, "NAT gateways", &what, work).await?;
        }
        let named = |id: &String, kind: &str| format!("{kind} {id}");
        removal
            .each(
                ledger,
                "Elastic IPs",
                "Elastic IP(s)",
                &self.addresses,
                |id| async move {
                    in_use_retry(
                        removal,
                        &named(id, "Elastic IP"),
                        "ec2:ReleaseAddress",
                        || ec2.release_address().allocation_id(id).send(),
                    )
                    .await
                },
            )
            .await?;
        let groups = &self.security_groups;
        removal
            .each(
                ledger,
                "security groups",
                "security group(s)",
                groups,
                |(id, name)| async move {
                    let resource = format!("security group {name} ({id})");
                    in_use_retry(removal, &resource, "ec2:DeleteSecurityGroup", || {
                        ec2.delete_security_group().group_id(id).send()
                    })
                    .await
                },
            )
            .await?;
        let tables = &self.route_tables;
        removal
            .each(
                ledger,
                "route tables",
                "route table(s)",
                tables,
                |(id, associations)| async move {
                    let resource = named(id, "route table");
                    // A table with subnets cannot go; they fall back to the VPC's main table
                    // until they go themselves.
                    for association in associations {
                        ec2.disassociate_route_table()
                            .association_id(association)
                            .send()
                            .await
                            .map_err(|e| {
                                DeployError::aws(&resource, "ec2:DisassociateRouteTable", &e)
                            })?;
                    }
                    in_use_retry(removal, &resource, "ec2:DeleteRouteTable", || {
                        ec2.delete_route_table().route_table_id(id).send()
                    })
                    .await
                },
            )
            .await?;
        removal
            .each(
                ledger,
                "subnets",
                "subnet(s)",
                &self.subnets,
                |id| async move {
                    in_use_retry(removal, &named(id, "subnet"), "ec2:DeleteSubnet", || {
                        ec2.delete_subnet().subnet_id(id).send()
                    })
                    .await
                },
            )
            .await?;
        let gateways = &self.gateways;
        removal
            .each(
                ledger,
                "internet gateway",
                "internet gateway(s)",
                gateways,
                |(id, vpcs)| async move {
                    let resource = named(id, "internet gateway");
                    for vpc in vpcs {
                        in_use_retry(removal, &resource, "ec2:DetachInternetGateway", || {
                            ec2.detach_internet_gateway()
                                .internet_gateway_id(id)
                                .vpc_id(vpc)
                                .send()
                        })
                        .await?;
                    }
                    in_use_retry(removal, &resource, "ec2:DeleteInternetGateway", || {
                        ec2.delete_internet_gateway().internet_gateway_id(id).send()
                    })
                    .await
                },
            )
            .await?;
        removal
            .each(ledger, "VPC", "VPC(s)", &self.vpcs, |id| async move {
                in_use_retry(removal, &named(id, "VPC"), "ec2:DeleteVpc", || {
                    ec2.delete_vpc().vpc_id(id).send()
                })
                .await
            })
            .await
    }
}
/// Makes an EC2 deletion, again while EC2 says something still uses the resource (the
/// network interfaces of what was just deleted take minutes to go).
async fn in_use_retry<F, Fut, T, E>(
    removal: &Removal<'_>,
    resource: &str,
    operation: &str,
    mut call: F,
) -> Result<(), DeployError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    removal
        .until_gone(resource, move || {
            let attempt = call();
            async move {
                match attempt.await {
                    Ok(_) => Ok(None),
                    Err(e) if e.code() == Some("DependencyViolation") => {
                        Ok(Some("still in use, waiting".to_owned()))
                    }
                    Err(e) => Err(DeployError::aws(resource, operation, &e)),
                }
            }
        })
        .await
}

/// Deletes a role with its inline and attached policies.
async fn remove_role(aws: &Clients, role: &str, dry_run: bool) -> Outcome<()> {
    if dry_run {
        return Ok(((), "would delete, with its policies".into()));
    }
    let resource = Role::resource(role);
    let (inline, attached) = bootstrap::role_policies(aws, role).await?;
    for policy in inline {
        aws.iam
            .delete_role_policy()
            .role_name(role)
            .policy_name(policy)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "iam:DeleteRolePolicy", &e))?;
    }
    for arn in attached {
        aws.iam
            .detach_role_policy()
            .role_name(role)
            .policy_arn(arn)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "iam:DetachRolePolicy", &e))?;
    }
    aws.iam
        .delete_role()
        .role_name(role)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "iam:DeleteRole", &e))?;
    Ok(((), "deleted, with its policies".into()))
}
