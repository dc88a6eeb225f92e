//! What the operator reads while the tool works, on stdout: a line at a time ([`say`]),
//! the announcement of what a command does, each step's outcome as the [`Ledger`] records it (and,
//! when a step fails, the report of what was done and what was not), and the short form
//! of a task definition's ARN that those lines name. Apply, destroy, bootstrap and wait
//! all write through here, so that none of them reaches into another for its output.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write as _;

use crate::error::{DeployError, Progress};

/// Prints a line of progress on stdout.
pub(crate) fn say(line: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    // Progress is best effort: a closed stdout must not stop a deploy midway.
    let _ = writeln!(out, "{line}");
}

/// Says what a command does (`doing`, like `Removing`), or plans to in a dry run
/// (`planning`, like `Planning the removal of`), to `what`.
pub(crate) fn announce(dry_run: bool, [planning, doing]: [&str; 2], what: &str) {
    if dry_run {
        say(format_args!(
            "{planning} {what} (dry run: nothing will be changed)"
        ));
    } else {
        say(format_args!("{doing} {what}"));
    }
}

/// What a removal says it does.
pub(crate) const REMOVING: [&str; 2] = ["Planning the removal of", "Removing"];

/// What a step gives back, with the line it reports.
pub(crate) type Outcome<T> = Result<(T, String), DeployError>;

/// What ran, what is left.
pub(crate) struct Ledger {
    done: Vec<String>,
    pending: VecDeque<String>,
}

impl Ledger {
    pub(crate) fn new(labels: Vec<String>) -> Self {
        Self {
            done: Vec::new(),
            pending: labels.into(),
        }
    }

    /// Runs one step; prints and records its outcome, or turns its failure into a report
    /// of what was done and what was not.
    pub(crate) async fn run<T>(
        &mut self,
        label: String,
        work: impl Future<Output = Outcome<T>>,
    ) -> Result<T, DeployError> {
        if let Some(at) = self.pending.iter().position(|planned| *planned == label) {
            self.pending.remove(at);
        }
        match work.await {
            Ok((value, outcome)) => {
                say(format_args!("  {label}: {outcome}"));
                self.done.push(format!("{label}: {outcome}"));
                Ok(value)
            }
            Err(source) => {
                let mut not_done = vec![format!("{label} (failed)")];
                not_done.extend(self.pending.drain(..));
                Err(DeployError::Midway {
                    failed: label,
                    error: Box::new(source),
                    progress: Progress {
                        done: std::mem::take(&mut self.done),
                        not_done,
                    },
                })
            }
        }
    }
}

/// `family:revision` of a task definition ARN.
pub(crate) fn revision(arn: &str) -> &str {
    arn.rsplit_once('/').map_or(arn, |(_, revision)| revision)
}
