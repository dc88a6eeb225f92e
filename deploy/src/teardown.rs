//! Removes what `bootstrap` created, after `destroy` has removed the services: the load
//! balancer and its target group, ElastiCache with its subnet group and AUTH token secret,
//! the ECS cluster, the roles, then the network from the NAT gateways down to the VPC.
//! Only what carries the deployment's tag is touched (a VPC of your own stays; the
//! security groups bootstrap put in it go). Each deletion is waited on before what
//! depends on it goes: the load balancer, ElastiCache and the NAT gateways take minutes,
//! and network interfaces linger after them, which EC2 reports as a dependency violation
//! that is waited out. A second run finds nothing and does nothing.

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::Filter;
use std::future::Future;

use crate::bootstrap::{self, Ctx, Names};
use crate::clients::Clients;
use crate::config::BootstrapConfig;
use crate::error::{DeployError, none_if};
use crate::output::{Ledger, Outcome};
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
    pub(crate) region: &'a str,
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

    fn ctx<'a>(&'a self, settings: &'a BootstrapConfig) -> Ctx<'a> {
        Ctx::removing(self.aws, self.name, self.region, settings, self.dry_run)
    }

    /// Finds what bootstrap created for the deployment; `cluster` is the cluster's name.
    pub(crate) async fn find(&self, cluster: &str) -> Result<Infrastructure, DeployError> {
        let settings = BootstrapConfig::default();
        let ctx = self.ctx(&settings);
        let names = Names::of(self.name);
        let mut found = Infrastructure {
            load_balancer: bootstrap::find_load_balancer(&ctx)
                .await?
                .ours()
                .map(|(arn, _)| arn),
            target_group: bootstrap::find_target_group(&ctx).await?.ours(),
            redis: bootstrap::find_redis(&ctx)
                .await?
                .ours()
                .map(|_| names.redis.clone()),
            subnet_group: bootstrap::find_subnet_group(&ctx).await?.ours(),
            secret: bootstrap::find_secret(&ctx, &names.secret).await?.ours(),
            cluster: bootstrap::find_cluster(&ctx, cluster)
                .await?
                .ours()
                .map(|()| cluster.to_owned()),
            ..Infrastructure::default()
        };
        for role in [&names.execution_role, &names.task_role] {
            if bootstrap::find_role(&ctx, role).await?.ours().is_some() {
                found.roles.push(role.clone());
            }
        }
        self.find_network(&mut found).await?;
        Ok(found)
    }

    async fn find_network(&self, found: &mut Infrastructure) -> Result<(), DeployError> {
        let ec2 = &self.aws.ec2;
        let tag = || bootstrap::tagged(self.name);
        let what = format!("EC2 resources tagged for {}", self.name);
        let nats = ec2
            .describe_nat_gateways()
            .filter(tag())
            .filter(
                Filter::builder()
                    .name("state")
                    .values("pending")
                    .values("available")
                    .values("deleting")
                    .values("failed")
                    .build(),
            )
            .send()
            .await
            .map_err(|e| DeployError::aws(&what, "ec2:DescribeNatGateways", &e))?;
        found.nat_gateways = nats
            .nat_gateways()
            .iter()
            .filter_map(|n| n.nat_gateway_id().map(str::to_owned))
            .collect();
        let addresses = ec2
            .describe_addresses()
            .filters(tag())
            .send()
            .await
            .map_err(|e| DeployError::aws(&what, "ec2:DescribeAddresses", &e))?;
        found.addresses = addresses
            .addresses()
            .iter()
            .filter_map(|a| a.allocation_id().map(str::to_owned))
            .collect();
        let groups = ec2
            .describe_security_groups()
            .filters(tag())
            .send()
            .await
            .map_err(|e| DeployError::aws(&what, "ec2:DescribeSecurityGroups", &e))?;
        found.security_groups = groups
            .security_groups()
            .iter()
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
        let subnets = ec2
            .describe_subnets()
            .filters(tag())
            .send()
            .await
            .map_err(|e| DeployError::aws(&what, "ec2:DescribeSubnets", &e))?;
        found.subnets = subnets
            .subnets()
            .iter()
            .filter_map(|s| s.subnet_id().map(str::to_owned))
            .collect();
        let tables = ec2
            .describe_route_tables()
            .filters(tag())
            .send()
            .await
            .map_err(|e| DeployError::aws(&what, "ec2:DescribeRouteTables", &e))?;
        found.route_tables = tables
            .route_tables()
            .iter()
            .filter_map(|t| {
                let associations = t
                    .associations()
                    .iter()
                    .filter(|a| a.main() != Some(true))
                    .filter_map(|a| a.route_table_association_id().map(str::to_owned))
                    .collect();
                Some((t.route_table_id()?.to_owned(), associations))
            })
            .collect();
        let gateways = ec2
            .describe_internet_gateways()
            .filters(tag())
            .send()
            .await
            .map_err(|e| DeployError::aws(&what, "ec2:DescribeInternetGateways", &e))?;
        found.gateways = gateways
            .internet_gateways()
            .iter()
            .filter_map(|g| {
                let vpcs = g
                    .attachments()
                    .iter()
                    .filter_map(|a| a.vpc_id().map(str::to_owned))
                    .collect();
                Some((g.internet_gateway_id()?.to_owned(), vpcs))
            })
            .collect();
        let vpcs = ec2
            .describe_vpcs()
            .filters(tag())
            .send()
            .await
            .map_err(|e| DeployError::aws(&what, "ec2:DescribeVpcs", &e))?;
        found.vpcs = vpcs
            .vpcs()
            .iter()
            .filter_map(|v| v.vpc_id().map(str::to_owned))
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
                        let found =
                            bootstrap::describe_replication_group(aws, id, resource).await?;
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
        // Each kind goes as one step: its label, and how many went.
        let counted = |n: usize, what: &str| format!("{n} {what}");
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
            let what = counted(self.nat_gateways.len(), "NAT gateway(s)");
            removal.step(ledger, "NAT gateways", &what, work).await?;
        }
        if !self.addresses.is_empty() {
            let work = async {
                for id in &self.addresses {
                    in_use_retry(
                        removal,
                        &format!("Elastic IP {id}"),
                        "ec2:ReleaseAddress",
                        || ec2.release_address().allocation_id(id).send(),
                    )
                    .await?;
                }
                Ok(())
            };
            let what = counted(self.addresses.len(), "Elastic IP(s)");
            removal.step(ledger, "Elastic IPs", &what, work).await?;
        }
        if !self.security_groups.is_empty() {
            let work = async {
                for (id, name) in &self.security_groups {
                    in_use_retry(
                        removal,
                        &format!("security group {name} ({id})"),
                        "ec2:DeleteSecurityGroup",
                        || ec2.delete_security_group().group_id(id).send(),
                    )
                    .await?;
                }
                Ok(())
            };
            let what = counted(self.security_groups.len(), "security group(s)");
            removal.step(ledger, "security groups", &what, work).await?;
        }
        if !self.route_tables.is_empty() {
            let work = async {
                for (id, associations) in &self.route_tables {
                    let resource = format!("route table {id}");
                    // A table with subnets cannot go; they fall back to the VPC's main
                    // table until they go themselves.
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
                    .await?;
                }
                Ok(())
            };
            let what = counted(self.route_tables.len(), "route table(s)");
            removal.step(ledger, "route tables", &what, work).await?;
        }
        if !self.subnets.is_empty() {
            let work = async {
                for id in &self.subnets {
                    in_use_retry(removal, &format!("subnet {id}"), "ec2:DeleteSubnet", || {
                        ec2.delete_subnet().subnet_id(id).send()
                    })
                    .await?;
                }
                Ok(())
            };
            let what = counted(self.subnets.len(), "subnet(s)");
            removal.step(ledger, "subnets", &what, work).await?;
        }
        if !self.gateways.is_empty() {
            let work = async {
                for (id, vpcs) in &self.gateways {
                    let resource = format!("internet gateway {id}");
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
                    .await?;
                }
                Ok(())
            };
            let what = counted(self.gateways.len(), "internet gateway(s)");
            removal
                .step(ledger, "internet gateway", &what, work)
                .await?;
        }
        if !self.vpcs.is_empty() {
            let work = async {
                for id in &self.vpcs {
                    in_use_retry(removal, &format!("VPC {id}"), "ec2:DeleteVpc", || {
                        ec2.delete_vpc().vpc_id(id).send()
                    })
                    .await?;
                }
                Ok(())
            };
            let what = counted(self.vpcs.len(), "VPC(s)");
            removal.step(ledger, "VPC", &what, work).await?;
        }
        Ok(())
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
    let resource = format!("IAM role {role}");
    let inline = aws
        .iam
        .list_role_policies()
        .role_name(role)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "iam:ListRolePolicies", &e))?;
    for policy in inline.policy_names() {
        aws.iam
            .delete_role_policy()
            .role_name(role)
            .policy_name(policy)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "iam:DeleteRolePolicy", &e))?;
    }
    let attached = aws
        .iam
        .list_attached_role_policies()
        .role_name(role)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "iam:ListAttachedRolePolicies", &e))?;
    for policy in attached.attached_policies() {
        aws.iam
            .detach_role_policy()
            .role_name(role)
            .set_policy_arn(policy.policy_arn().map(str::to_owned))
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
