//! Process plumbing the binaries share: structured logging to stderr, a throttle that keeps
//! repeated warnings from flooding it, and the shutdown signal (SIGTERM from ECS, Ctrl-C at a
//! terminal).

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Logs to stderr at `RUST_LOG` (default `info`), as JSON when `FJORD_LOG_FORMAT=json`.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = if std::env::var("FJORD_LOG_FORMAT").is_ok_and(|format| format == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second call (tests) keeps the first subscriber.
    drop(installed);
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What every deployed binary is told on its command line: where its manifest is, and how
/// much a failure says.
#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    /// The manifest (`FJORD_MANIFEST_JSON`, when set, holds the manifest itself instead).
    #[arg(long, env = "FJORD_MANIFEST", default_value = "manifest.json")]
    pub manifest: std::path::PathBuf,
    /// On failure, print the error's full chain and backtrace, not one line.
    #[arg(long)]
    pub verbose: bool,
}

/// A binary's exit: success, or, when it failed, one line on stderr naming the error and
/// each of its causes, `error: connecting to redis: Connection refused` (the alternate form
/// of the binaries' `anyhow` errors), and exit status 1. A user who needs more asks for it:
/// `verbose` prints the debug form, with the causes and any backtrace the error carries.
pub fn exit_code<E: std::fmt::Display + std::fmt::Debug>(
    outcome: Result<(), E>,
    verbose: bool,
) -> std::process::ExitCode {
    let Err(error) = outcome else {
        return std::process::ExitCode::SUCCESS;
    };
    #[allow(
        clippy::print_stderr,
        reason = "the failure is the command's last output"
    )]
    if verbose {
        eprintln!("error: {error:?}");
    } else {
        eprintln!("error: {error:#}");
    }
    std::process::ExitCode::FAILURE
}

/// Lets a repeated warning through at most once per interval, so a flood (failed accepts,
/// refused origins, invalid bus entries) cannot fill the log; each line that passes tells how
/// many were held back since the last one.
#[derive(Debug)]
pub struct LogThrottle {
    interval: std::time::Duration,
    state: std::sync::Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// At most one line per `interval`.
    pub const fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            state: std::sync::Mutex::new(ThrottleState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many were held back
    /// since the last logged one; `None` when it should be counted and dropped.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(std::time::Instant::now())
    }

    fn admit_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match state.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::LogThrottle;

    #[test]
    fn a_flood_is_logged_once_per_interval_with_the_count_held_back() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.admit_at(start), Some(0));
        for i in 1..=99 {
            assert_eq!(throttle.admit_at(start + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.admit_at(start + Duration::from_secs(10)), Some(99));
        assert_eq!(throttle.admit_at(start + Duration::from_secs(11)), None);
    }
}
