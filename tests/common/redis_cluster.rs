//! Real Redis Clusters for the tests, made, killed and stopped by `ci/redis-cluster.sh`: a
//! private one per test ([`RedisCluster::start`], gone when dropped) for tests that kill its
//! nodes, and the shared one of `ci/services.sh` ([`RedisCluster::shared`]) that
//! `FJORD_TEST_BUS=cluster` runs the bus tests on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs `ci/redis-cluster.sh COMMAND DIR ARGS...`; its standard output, trimmed, or its
/// standard error when it fails.
fn script(command: &str, dir: &Path, args: &[String]) -> Result<String, String> {
    let script = super::repo_root().join("ci/redis-cluster.sh");
    let output = Command::new(&script)
        .arg(command)
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("run {}: {error}", script.display()));
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).unwrap().trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// A Redis Cluster of Debian `redis-server` processes on loopback.
#[derive(Debug)]
pub struct RedisCluster {
    dir: PathBuf,
    /// The private cluster's folder; `None` for the shared cluster, which outlives the test.
    owned: Option<tempfile::TempDir>,
}

impl RedisCluster {
    /// A cluster of its own: `primaries` primaries with `replicas` replicas each, on a block of
    /// free ports in a temporary folder; every slot served and every replica in sync when it
    /// returns.
    pub fn start(primaries: u16, replicas: u16) -> Self {
        let nodes = primaries * (1 + replicas);
        let mut failures = Vec::new();
        // Another process may take a port of the block between the check and the node's
        // bind; the script then refuses that block, and another is tried.
        for _ in 0..3 {
            let temp = tempfile::tempdir().unwrap();
            // The nodes' ports, then their cluster bus ports.
            let base = super::free_ports(2 * nodes);
            let shape = [base, primaries, replicas].map(|n| n.to_string());
            match script("up", temp.path(), &shape) {
                Ok(_) => {
                    return Self {
                        dir: temp.path().to_owned(),
                        owned: Some(temp),
                    };
                }
                Err(error) => {
                    let _ = script("down", temp.path(), &[]);
                    failures.push(error);
                }
            }
        }
        panic!(
            "no Redis Cluster of {primaries} primaries × {replicas} replicas started:\n{}",
            failures.join("\n")
        );
    }

    /// The cluster that `ci/services.sh up` started under `$FJORD_CI_STATE/redis-cluster`.
    pub fn shared() -> Self {
        Self {
            dir: Path::new(&super::required_env("FJORD_CI_STATE")).join("redis-cluster"),
            owned: None,
        }
    }

    /// Where the script keeps the nodes' configuration, data, pid files and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn run(&self, command: &str, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        script(command, &self.dir, &args).unwrap_or_else(|error| {
            panic!(
                "ci/redis-cluster.sh {command} {} {args:?} failed:\n{error}",
                self.dir.display()
            )
        })
    }

    fn port(&self, command: &str, key: &str) -> u16 {
        let out = self.run(command, &[key]);
        out.parse()
            .unwrap_or_else(|_| panic!("ci/redis-cluster.sh {command} printed {out:?}"))
    }

    /// `redis://127.0.0.1:PORT` of every node, primaries first.
    pub fn urls(&self) -> Vec<String> {
        self.run("urls", &[])
            .split(',')
            .map(str::to_owned)
            .collect()
    }

    /// The port of the primary that serves `key`'s slot.
    pub fn primary_of(&self, key: &str) -> u16 {
        self.port("primary-of", key)
    }

    /// Kills (SIGKILL) the primary that serves `key`'s slot; returns its port.
    pub fn kill_primary_of(&self, key: &str) -> u16 {
        self.port("kill-primary-of", key)
    }

    /// Waits until a replica took over `key`'s slot and the cluster is ok again; returns the
    /// new primary's port.
    pub fn wait_failover(&self, key: &str) -> u16 {
        self.port("wait-failover", key)
    }

    /// Starts every node that is not running, keeping its data (a killed primary comes back
    /// as a replica); returns once the cluster is ok with every replica in sync.
    pub fn restart_stopped(&self) {
        self.run("start", &[]);
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if self.owned.is_some() {
            let _ = script("down", &self.dir, &[]);
        }
    }
}
