//! Why a deploy stopped. Every error names the resource it concerns and carries the AWS
//! or registry error whole; a failure after the first change also says what was done and
//! what was not.

use std::fmt;

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};

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

/// An SDK call's result, where the service error that `absent` recognises (a "not found",
/// or a state that means the work is already under way) is `Ok(None)`; any other error
/// is mapped as [`DeployError::aws`] maps it.
pub(crate) fn none_if<T, E, R>(
    result: Result<T, SdkError<E, R>>,
    absent: impl FnOnce(&E) -> bool,
    resource: &str,
    operation: &str,
) -> Result<Option<T>, DeployError>
where
    SdkError<E, R>: std::error::Error + ProvideErrorMetadata + 'static,
{
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.as_service_error().is_some_and(absent) => Ok(None),
        Err(e) => Err(DeployError::aws(resource, operation, &e)),
    }
}

impl DeployError {
    /// An AWS error on `resource` in `operation` (`ec2:CreateVpc`, the IAM action's
    /// name where the caller gives it), with the SDK's full error chain. A call that AWS
    /// denied names the permission that is missing.
    pub fn aws<E>(resource: impl Into<String>, operation: &str, error: &E) -> Self
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
    {
        let message = if is_denied(error.code()) {
            let permission = if operation.contains(':') {
                format!("the IAM permission {operation}")
            } else {
                format!("the IAM permission for {operation}")
            };
            format!(
                "{operation}: access denied: the AWS credentials in use lack {permission} ({})",
                error.message().unwrap_or("no message")
            )
        } else {
            format!(
                "{operation}: {}",
                aws_sdk_ecs::error::DisplayErrorContext(error)
            )
        };
        Self::Aws {
            resource: resource.into(),
            message,
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

/// Whether an AWS error code says the caller may not make the call: IAM's, the query
/// services' and EC2's spellings of it.
fn is_denied(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "AccessDenied"
                | "AccessDeniedException"
                | "UnauthorizedOperation"
                | "UnauthorizedAccess"
                | "AuthorizationError"
                | "NotAuthorized"
        )
    )
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

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::error::{ErrorMetadata, SdkError};
    use aws_sdk_ec2::operation::create_vpc::CreateVpcError;

    use super::*;

    fn failure(code: &str, message: &str) -> SdkError<CreateVpcError, ()> {
        let error =
            CreateVpcError::generic(ErrorMetadata::builder().code(code).message(message).build());
        SdkError::service_error(error, ())
    }

    #[test]
    fn a_denied_call_names_the_missing_permission() {
        let error = DeployError::aws(
            "VPC fjord",
            "ec2:CreateVpc",
            &failure(
                "UnauthorizedOperation",
                "You are not authorized to perform this operation.",
            ),
        );
        assert_eq!(
            error.to_string(),
            "VPC fjord: ec2:CreateVpc: access denied: the AWS credentials in use lack the IAM permission ec2:CreateVpc (You are not authorized to perform this operation.)"
        );
        let other = DeployError::aws(
            "VPC fjord",
            "ec2:CreateVpc",
            &failure("VpcLimitExceeded", "too many"),
        );
        assert!(!other.to_string().contains("access denied"), "{other}");
    }
}
