//! `fjord-deploy`: deploys Fjord to AWS ECS on Fargate from the manifest's `deploy` section.
//!
//! ```text
//! manifest.json ──► config ──► bootstrap ──► document (ids written back)
//! manifest.json ──► config ──► plan ──► apply ──► wait
//! image archives ──► archive ──► registry (ECR)
//! ```
//!
//! - [`bootstrap`]: from an empty account, what a deploy runs on (VPC, load balancer,
//!   ElastiCache, cluster, roles, log group), tagged, idempotent, resumable.
//! - [`document`]: the manifest file edited in place, its key order kept.
//! - [`config`]: the `deploy` section, typed and validated with the runtime sections.
//! - [`archive`]: Nix-built docker archives turned into registry blobs and a manifest.
//! - [`registry`]: pushes images with an ECR token, skipping blobs already there.
//! - [`plan`]: task definitions, services and scaling policies wanted, as AWS requests;
//!   the tags and target group settings that every step agrees on.
//! - [`apply`]: the steps against AWS, read first, changing only what differs.
//! - [`destroy`]: finds what deploys and bootstrap made by name and tag; prunes and
//!   tears it down, bootstrap's part in [`teardown`].
//! - [`wait`]: waits until each service's PRIMARY deployment runs the task definition
//!   the deploy registered, steady (or drains), and prints their state.
//! - [`status`], [`diff`], [`verify`]: read-only looks at the deployment — where the
//!   services stand, what a deploy would change, whether what the tasks need is there.
//! - [`rollback`]: each service back one task definition revision, waited on.
//! - [`policy`]: the IAM policy each command needs, printed from code.
//! - [`ownership`]: what is the deployment's own — each AWS resource kind found by its
//!   name and judged by its tag, for bootstrap, destroy and teardown alike.
//! - [`error`]: why a deploy stopped, and what it had done by then.
//! - [`clients`]: the AWS clients of one region, shared by every part that calls AWS.
//! - [`output`]: what the operator reads as a run goes: progress lines, each step's
//!   outcome, the report of what was done; apply, destroy, bootstrap and wait write
//!   through it.
//!
//! Imports run one way: `apply` → `destroy` (prune) → `teardown` → `bootstrap` (the
//! log group, the roles' policies, the waits on what it made); each of those →
//! `ownership`, `wait`, `output`, `plan`, `clients`, `error`; none back.
//! `status`, `diff`, `rollback` and `verify` sit beside `apply`, on the same lower
//! modules; `policy` reads only the manifest.

pub mod apply;
pub mod archive;
pub mod bootstrap;
mod clients;
pub mod config;
pub mod destroy;
pub mod diff;
pub mod document;
pub mod error;
mod output;
mod ownership;
pub mod plan;
pub mod policy;
pub mod registry;
pub mod rollback;
mod status;
mod teardown;
mod verify;
mod wait;

pub use apply::{Options, deploy};
pub use bootstrap::{BootstrapOptions, bootstrap};
pub use config::Deployment;
pub use destroy::{DestroyOptions, destroy};
pub use diff::diff;
pub use error::DeployError;
pub use rollback::rollback;
pub use status::status;
pub use verify::verify;
