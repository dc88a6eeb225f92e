//! Why a deploy stopped. Every error names the resource it concerns and carries the AWS
//! or registry error whole; a failure after the first change also says what was done and
//! what was not.

use std::fmt;

use crate::archive::ArchiveError;
use crate::registry::RegistryError;

/// Why a deploy stopped.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// An image archive cannot be used (found before any AWS call).
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// An AWS call failed.
    #[error("{resource}: {message}")]
    Aws {
        /// The resource, like `ECS service fjord-server`.
        resource: String,
        /// The operation and the AWS error.
        message: String,
    },
    /// AWS is not ready for the deploy; found by read-only checks, nothing was changed.
    #[error("{resource}: {message} (nothing was changed)")]
    Precondition {
        /// The resource, like `ECS cluster fjord`.
        resource: String,
        /// What is missing or wrong.
        message: String,
    },
    /// The registry refused an image.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Services did not become stable.
    #[error("{0}")]
    NotStable(String),
    /// A step failed after others had run.
    #[error("{failed} failed: {error}\n{progress}")]
    Midway {
        /// The step that failed.
        failed: String,
        /// Why.
        error: Box<DeployError>,
        /// What was done and what was not.
        progress: Progress,
    },
}

impl DeployError {
    /// An AWS error on `resource` in `operation`, with the SDK's full error chain.
    pub fn aws(
        resource: impl Into<String>,
        operation: &str,
        error: &(dyn std::error::Error + 'static),
    ) -> Self {
        Self::Aws {
            resource: resource.into(),
            message: format!(
                "{operation}: {}",
                aws_sdk_ecs::error::DisplayErrorContext(error)
            ),
        }
    }

    /// A request the deploy itself failed to build.
    pub fn request(resource: impl Into<String>, error: &aws_sdk_ecs::error::BuildError) -> Self {
        Self::Aws {
            resource: resource.into(),
            message: format!("building the request: {error}"),
        }
    }
}

/// The steps of a deploy that ran and those that did not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Steps that finished, with what they did.
    pub done: Vec<String>,
    /// Steps that did not run or did not finish.
    pub not_done: Vec<String>,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "done:")?;
        if self.done.is_empty() {
            writeln!(f, "  (nothing)")?;
        }
        for step in &self.done {
            writeln!(f, "  - {step}")?;
        }
        write!(f, "not done:")?;
        for step in &self.not_done {
            write!(f, "\n  - {step}")?;
        }
        Ok(())
    }
}
