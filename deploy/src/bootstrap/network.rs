//! The network bootstrap creates: a VPC over two or three zones, a public and a private
//! subnet in each, an internet gateway, NAT gateways (one, or one per zone) with their
//! Elastic IPs, route tables, and the security groups (load balancer → tasks on the server
//! port, tasks → Redis). Every EC2 resource is found by its `Name` tag and the deployment
//! tag, and created with both (tagged in the same call, so that an interruption leaves
//! nothing untagged).

use std::net::Ipv4Addr;

use aws_sdk_ec2::types::{
    Address, AttributeBooleanValue, DomainType, Filter, InternetGateway, IpPermission, IpRange,
    NatGateway, ResourceType, RouteTable, SecurityGroup, Subnet, Tag, TagSpecification,
    UserIdGroupPair, Vpc,
};

use super::{Ctx, PLANNED, id};
use crate::clients::Clients;
use crate::config::{NatGateways, vpc_prefix};
use crate::error::DeployError;
use crate::output::Outcome;
use crate::ownership::Named;
use crate::plan::DEPLOYMENT_TAG;
use crate::wait;

/// The network the tasks, the load balancer and Redis use.
#[derive(Debug, Clone)]
pub(super) struct Network {
    pub(super) vpc: String,
    /// The load balancer's subnets.
    pub(super) public: Vec<String>,
    /// The tasks' and Redis's subnets.
    pub(super) private: Vec<String>,
    /// The NAT gateways' public addresses: what Kafka must allow.
    pub(super) nat_addresses: Vec<String>,
}

fn tags(ctx: &Ctx<'_>, kind: ResourceType, name: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .tags(Tag::builder().key("Name").value(name).build())
        .tags(Tag::builder().key(DEPLOYMENT_TAG).value(ctx.name).build())
        .build()
}

/// The `index`th of the sixteen equal blocks of `cidr`.
fn block(cidr: &str, index: u32) -> Option<String> {
    let (base, prefix) = vpc_prefix(cidr)?;
    let size = 1u32 << (32 - u32::from(prefix) - 4);
    let start = u32::from(base).checked_add(size.checked_mul(index)?)?;
    Some(format!("{}/{}", Ipv4Addr::from(start), prefix + 4))
}

/// The zones the VPC spans: the region's first available ones.
pub(super) async fn zones(ctx: &Ctx<'_>, count: u8) -> Result<Vec<String>, DeployError> {
    let found = ctx
        .aws
        .ec2
        .describe_availability_zones()
        .filters(Filter::builder().name("state").values("available").build())
        .send()
        .await
        .map_err(|e| DeployError::aws("availability zones", "ec2:DescribeAvailabilityZones", &e))?;
    let mut zones: Vec<String> = found
        .availability_zones()
        .iter()
        .filter(|z| z.zone_type().is_none_or(|t| t == "availability-zone"))
        .filter_map(|z| z.zone_name())
        .map(str::to_owned)
        .collect();
    zones.sort();
    if zones.len() < usize::from(count) {
        return Err(DeployError::Precondition {
            resource: format!("region {}", ctx.region),
            message: format!(
                "has {} available zones; $.deploy.bootstrap.availability_zones asks for {count}",
                zones.len()
            ),
        });
    }
    zones.truncate(usize::from(count));
    Ok(zones)
}

/// The deployment's VPC, if it has one.
pub(super) async fn find_vpc(ctx: &Ctx<'_>) -> Result<Option<String>, DeployError> {
    let vpc = ctx.lookup::<Vpc>(ctx.name).await?.ours();
    Ok(vpc.and_then(|v| v.vpc_id().map(str::to_owned)))
}

/// Finds or creates the VPC and everything in it; waits for the NAT gateways.
pub(super) async fn ensure(ctx: &Ctx<'_>, zones: &[String]) -> Outcome<Network> {
    let settings = &ctx.settings;
    let ec2 = &ctx.aws.ec2;
    let mut created = Vec::new();
    let found = ctx.find_or_create(
        ctx.name,
        "VPC",
        &mut created,
        |found: Vpc| id(found.vpc_id()),
        || async {
            let resource = Vpc::resource(ctx.name);
            let vpc = ec2
                .create_vpc()
                .cidr_block(&settings.vpc_cidr)
                .tag_specifications(tags(ctx, ResourceType::Vpc, ctx.name))
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "ec2:CreateVpc", &e))?;
            let vpc = id(vpc.vpc().and_then(|v| v.vpc_id()));
            // ElastiCache and ECR endpoints are reached by name from the private subnets.
            ec2.modify_vpc_attribute()
                .vpc_id(&vpc)
                .enable_dns_hostnames(AttributeBooleanValue::builder().value(true).build())
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "ec2:ModifyVpcAttribute", &e))?;
            Ok(vpc)
        },
    );
    let vpc = found.await?.unwrap_or_else(|| PLANNED.to_owned());

    let mut public = Vec::new();
    let mut private = Vec::new();
    for (i, zone) in (0u32..).zip(zones) {
        for (kind, offset, list) in [("public", 0, &mut public), ("private", 8, &mut private)] {
            let name = format!("{}-{kind}-{zone}", ctx.name);
            let cidr = block(&settings.vpc_cidr, offset + i).unwrap_or_default();
            list.push(subnet(ctx, &vpc, &name, zone, &cidr, &mut created).await?);
        }
    }

    let (gateway, new) = internet_gateway(ctx, &vpc).await?;
    if new {
        created.push("internet gateway");
    }
    let public_table = format!("{}-public", ctx.name);
    if route_table(
        ctx,
        &vpc,
        &public_table,
        Target::Internet(&gateway),
        &public,
    )
    .await?
    {
        created.push("route");
    }

    let nat_zones: Vec<(usize, &String)> = match settings.nat_gateways {
        NatGateways::One => zones.iter().enumerate().take(1).collect(),
        NatGateways::PerZone => zones.iter().enumerate().collect(),
    };
    let mut nats = Vec::new();
    let mut nat_addresses = Vec::new();
    for (i, zone) in nat_zones {
        let name = format!("{}-nat-{zone}", ctx.name);
        let subnet = public.get(i).cloned().unwrap_or_default();
        let (nat, address, new) = nat_gateway(ctx, &name, &subnet).await?;
        if new {
            created.push("NAT gateway");
        }
        nats.push(nat);
        nat_addresses.push(address);
    }
    if !ctx.dry_run {
        for nat in &nats {
            wait_for_nat(ctx, nat).await?;
        }
    }
    for (i, (zone, subnet)) in zones.iter().zip(&private).enumerate() {
        let nat = nats.get(i).or(nats.first()).cloned().unwrap_or_default();
        let table = format!("{}-private-{zone}", ctx.name);
        if route_table(
            ctx,
            &vpc,
            &table,
            Target::Nat(&nat),
            std::slice::from_ref(subnet),
        )
        .await?
        {
            created.push("route");
        }
    }

    let outcome = if created.is_empty() {
        format!(
            "exists: {vpc}, {} zones, {} NAT gateway(s)",
            zones.len(),
            nats.len()
        )
    } else if ctx.dry_run {
        format!(
            "would create {} ({} zones: {}; {} NAT gateway(s))",
            summary(&created),
            zones.len(),
            zones.join(", "),
            nats.len()
        )
    } else {
        format!(
            "{vpc}: created {} ({} zones, {} NAT gateway(s))",
            summary(&created),
            zones.len(),
            nats.len()
        )
    };
    Ok((
        Network {
            vpc,
            public,
            private,
            nat_addresses,
        },
        outcome,
    ))
}

/// `VPC, 4 subnets, route × 3` from the list of what was created.
fn summary(created: &[&str]) -> String {
    let mut parts: Vec<(String, usize)> = Vec::new();
    for item in created {
        match parts.iter_mut().find(|(name, _)| name == item) {
            Some((_, count)) => *count += 1,
            None => parts.push(((*item).to_owned(), 1)),
        }
    }
    parts
        .iter()
        .map(|(name, count)| {
            if *count == 1 {
                name.clone()
            } else {
                format!("{count} {name}s")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds or creates the subnet `name`, noting it in `created` where it is (or would be)
/// created; returns its id.
async fn subnet(
    ctx: &Ctx<'_>,
    vpc: &str,
    name: &str,
    zone: &str,
    cidr: &str,
    created: &mut Vec<&'static str>,
) -> Result<String, DeployError> {
    let found = ctx.find_or_create(
        name,
        "subnet",
        created,
        |found: Subnet| id(found.subnet_id()),
        || async {
            let made = ctx
                .aws
                .ec2
                .create_subnet()
                .vpc_id(vpc)
                .cidr_block(cidr)
                .availability_zone(zone)
                .tag_specifications(tags(ctx, ResourceType::Subnet, name))
                .send()
                .await
                .map_err(|e| DeployError::aws(Subnet::resource(name), "ec2:CreateSubnet", &e))?;
            Ok(id(made.subnet().and_then(|s| s.subnet_id())))
        },
    );
    Ok(found.await?.unwrap_or_else(|| PLANNED.to_owned()))
}

async fn internet_gateway(ctx: &Ctx<'_>, vpc: &str) -> Result<(String, bool), DeployError> {
    let ec2 = &ctx.aws.ec2;
    let resource = InternetGateway::resource(ctx.name);
    let found = ctx.lookup::<InternetGateway>(ctx.name).await?.ours();
    let (id, attached, new) = match found {
        Some(gateway) => (
            id(gateway.internet_gateway_id()),
            gateway
                .attachments()
                .iter()
                .any(|a| a.vpc_id() == Some(vpc)),
            false,
        ),
        None if ctx.dry_run => return Ok((PLANNED.to_owned(), true)),
        None => {
            let created = ec2
                .create_internet_gateway()
                .tag_specifications(tags(ctx, ResourceType::InternetGateway, ctx.name))
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "ec2:CreateInternetGateway", &e))?;
            let gateway = created.internet_gateway();
            (
                id(gateway.and_then(|g| g.internet_gateway_id())),
                false,
                true,
            )
        }
    };
    // Created but not attached: an interrupted run.
    if !attached && !ctx.dry_run {
        ec2.attach_internet_gateway()
            .internet_gateway_id(&id)
            .vpc_id(vpc)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "ec2:AttachInternetGateway", &e))?;
    }
    Ok((id, new || !attached))
}

/// Where a route table sends `0.0.0.0/0`.
#[derive(Clone, Copy)]
enum Target<'a> {
    Internet(&'a str),
    Nat(&'a str),
}

/// Finds or creates the route table `name` with its default route and its subnets;
/// returns whether anything was (or would be) created.
async fn route_table(
    ctx: &Ctx<'_>,
    vpc: &str,
    name: &str,
    target: Target<'_>,
    subnets: &[String],
) -> Result<bool, DeployError> {
    let ec2 = &ctx.aws.ec2;
    let resource = RouteTable::resource(name);
    let found = ctx.lookup::<RouteTable>(name).await?.ours();
    let table = found.as_ref();
    if table.is_none() && ctx.dry_run {
        return Ok(true);
    }
    let mut changed = false;
    let id = match table.and_then(|t| t.route_table_id()) {
        Some(id) => id.to_owned(),
        None => {
            changed = true;
            ec2.create_route_table()
                .vpc_id(vpc)
                .tag_specifications(tags(ctx, ResourceType::RouteTable, name))
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "ec2:CreateRouteTable", &e))?
                .route_table()
                .and_then(|t| t.route_table_id())
                .unwrap_or_default()
                .to_owned()
        }
    };
    let has_default = table.is_some_and(|t| {
        t.routes()
            .iter()
            .any(|r| r.destination_cidr_block() == Some("0.0.0.0/0"))
    });
    if !has_default {
        changed = true;
        if !ctx.dry_run {
            let route = ec2
                .create_route()
                .route_table_id(&id)
                .destination_cidr_block("0.0.0.0/0");
            let route = match target {
                Target::Internet(gateway) => route.gateway_id(gateway),
                Target::Nat(nat) => route.nat_gateway_id(nat),
            };
            route
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "ec2:CreateRoute", &e))?;
        }
    }
    for subnet in subnets {
        let associated = table.is_some_and(|t| {
            t.associations()
                .iter()
                .any(|a| a.subnet_id() == Some(subnet.as_str()))
        });
        if !associated {
            changed = true;
            if !ctx.dry_run {
                ec2.associate_route_table()
                    .route_table_id(&id)
                    .subnet_id(subnet)
                    .send()
                    .await
                    .map_err(|e| DeployError::aws(&resource, "ec2:AssociateRouteTable", &e))?;
            }
        }
    }
    Ok(changed)
}

/// Finds or creates a NAT gateway with its Elastic IP; returns its id, its public
/// address and whether it was (or would be) created.
async fn nat_gateway(
    ctx: &Ctx<'_>,
    name: &str,
    subnet: &str,
) -> Result<(String, String, bool), DeployError> {
    let ec2 = &ctx.aws.ec2;
    let resource = NatGateway::resource(name);
    if let Some(nat) = ctx.lookup::<NatGateway>(name).await?.ours() {
        let address = nat
            .nat_gateway_addresses()
            .iter()
            .find_map(|a| a.public_ip())
            .unwrap_or("(pending)")
            .to_owned();
        return Ok((id(nat.nat_gateway_id()), address, false));
    }
    let found = ctx.lookup::<Address>(name).await?.ours();
    let existing = found.as_ref();
    if ctx.dry_run {
        let address = existing
            .and_then(|a| a.public_ip())
            .unwrap_or("(new Elastic IP)");
        return Ok((PLANNED.to_owned(), address.to_owned(), true));
    }
    let (allocation, address) = match existing {
        Some(address) => (id(address.allocation_id()), id(address.public_ip())),
        None => {
            let allocated = ec2
                .allocate_address()
                .domain(DomainType::Vpc)
                .tag_specifications(tags(ctx, ResourceType::ElasticIp, name))
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "ec2:AllocateAddress", &e))?;
            (id(allocated.allocation_id()), id(allocated.public_ip()))
        }
    };
    let created = ec2
        .create_nat_gateway()
        .subnet_id(subnet)
        .allocation_id(allocation)
        .tag_specifications(tags(ctx, ResourceType::Natgateway, name))
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "ec2:CreateNatGateway", &e))?;
    let nat = id(created.nat_gateway().and_then(|n| n.nat_gateway_id()));
    Ok((nat, address, true))
}

/// The NAT gateway `id` as EC2 describes it (a deleted one stays listed for a while).
pub(crate) async fn describe_nat_gateway(
    aws: &Clients,
    id: &str,
    resource: &str,
) -> Result<Option<NatGateway>, DeployError> {
    let found = aws
        .ec2
        .describe_nat_gateways()
        .nat_gateway_ids(id)
        .send()
        .await
        .map_err(|e| DeployError::aws(resource, "ec2:DescribeNatGateways", &e))?;
    Ok(found.nat_gateways().first().cloned())
}

/// Waits for a NAT gateway to become available (a few minutes in AWS).
async fn wait_for_nat(ctx: &Ctx<'_>, id: &str) -> Result<(), DeployError> {
    let resource = &format!("NAT gateway {id}");
    wait::until(resource, ctx.timeout, ctx.poll, move || async move {
        let nat = describe_nat_gateway(ctx.aws, id, resource).await?;
        let nat = nat.as_ref();
        match nat.and_then(|n| n.state()).map(|s| s.as_str()) {
            Some("available") => Ok(None),
            Some("failed" | "deleted" | "deleting") => Err(DeployError::Aws {
                resource: resource.clone(),
                message: format!(
                    "the NAT gateway failed: {}",
                    nat.and_then(|n| n.failure_message())
                        .unwrap_or("no reason given")
                ),
            }),
            state => Ok(Some(state.unwrap_or("unknown").to_owned())),
        }
    })
    .await
    .map(drop)
}

/// Who may reach a security group's port.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// Anyone (the load balancer's listeners).
    Anywhere,
    /// Members of these security groups.
    Groups(Vec<String>),
}

/// Finds or creates the security group `name` in `vpc`, allowing `source` on each of
/// `ports`; returns its id, and adds its name to `made` where anything was (or would be)
/// created.
pub(super) async fn security_group(
    ctx: &Ctx<'_>,
    vpc: &str,
    name: &str,
    description: &str,
    ports: &[i32],
    source: &Source,
    made: &mut Vec<String>,
) -> Result<String, DeployError> {
    let ec2 = &ctx.aws.ec2;
    let resource = SecurityGroup::resource(name);
    let found = ctx.lookup::<SecurityGroup>(name).await?.ours();
    let group = found.as_ref();
    if group.is_none() && ctx.dry_run {
        made.push(name.to_owned());
        return Ok(PLANNED.to_owned());
    }
    let mut changed = false;
    let id = match group.and_then(|g| g.group_id()) {
        Some(id) => id.to_owned(),
        None => {
            changed = true;
            ec2.create_security_group()
                .group_name(name)
                .description(description)
                .vpc_id(vpc)
                .tag_specifications(tags(ctx, ResourceType::SecurityGroup, name))
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "ec2:CreateSecurityGroup", &e))?
                .group_id()
                .unwrap_or_default()
                .to_owned()
        }
    };
    let allowed = |port: i32, permission: &IpPermission| {
        permission.from_port() == Some(port)
            && permission.to_port() == Some(port)
            && match source {
                Source::Anywhere => permission
                    .ip_ranges()
                    .iter()
                    .any(|r| r.cidr_ip() == Some("0.0.0.0/0")),
                Source::Groups(groups) => groups.iter().all(|g| {
                    permission
                        .user_id_group_pairs()
                        .iter()
                        .any(|p| p.group_id() == Some(g.as_str()))
                }),
            }
    };
    for port in ports {
        let present = group.is_some_and(|g| g.ip_permissions().iter().any(|p| allowed(*port, p)));
        if present {
            continue;
        }
        changed = true;
        if ctx.dry_run || source_planned(source) {
            continue;
        }
        let mut permission = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(*port)
            .to_port(*port);
        permission = match source {
            Source::Anywhere => {
                permission.ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
            }
            Source::Groups(groups) => groups.iter().fold(permission, |p, g| {
                p.user_id_group_pairs(UserIdGroupPair::builder().group_id(g).build())
            }),
        };
        ec2.authorize_security_group_ingress()
            .group_id(&id)
            .ip_permissions(permission.build())
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "ec2:AuthorizeSecurityGroupIngress", &e))?;
    }
    if changed {
        made.push(name.to_owned());
    }
    Ok(id)
}

fn source_planned(source: &Source) -> bool {
    matches!(source, Source::Groups(groups) if groups.iter().any(|g| g == PLANNED))
}

/// The VPC of subnets named in the manifest (a network of your own).
pub(super) async fn vpc_of(ctx: &Ctx<'_>, subnets: &[String]) -> Result<String, DeployError> {
    let resource = "subnets of $.deploy.network.subnets";
    let found = ctx
        .aws
        .ec2
        .describe_subnets()
        .set_subnet_ids(Some(subnets.to_vec()))
        .send()
        .await
        .map_err(|e| DeployError::aws(resource, "ec2:DescribeSubnets", &e))?;
    let mut vpcs: Vec<&str> = found.subnets().iter().filter_map(|s| s.vpc_id()).collect();
    vpcs.sort_unstable();
    vpcs.dedup();
    match vpcs.as_slice() {
        [vpc] => Ok((*vpc).to_owned()),
        [] => Err(DeployError::Precondition {
            resource: resource.into(),
            message: "not found".into(),
        }),
        _ => Err(DeployError::Precondition {
            resource: resource.into(),
            message: format!(
                "they span several VPCs ({}): name subnets of one",
                vpcs.join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_sixteenths_of_the_vpc() {
        assert_eq!(block("10.0.0.0/16", 0).as_deref(), Some("10.0.0.0/20"));
        assert_eq!(block("10.0.0.0/16", 9).as_deref(), Some("10.0.144.0/20"));
        assert_eq!(
            block("192.168.4.0/23", 15).as_deref(),
            Some("192.168.5.224/27")
        );
        assert_eq!(block("192.168.4.0/24", 0), None);
        assert_eq!(summary(&["VPC", "subnet", "subnet"]), "VPC, 2 subnets");
    }
}
