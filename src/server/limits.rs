//! How many connections one server holds: streams overall, per client address and per
//! token subject, each refused with a 503 past its limit; and file descriptors, of which a
//! share is never given to streams, so that `/healthz`, `/readyz` and `/metrics` answer while
//! streams are at their limit. Every accepted socket holds a [`Slot`] until it closes; a
//! socket still sending its request head may be given up to make room for a new one, so idle
//! connections cannot take the descriptors the health checks need.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::metrics::Metrics;
use fjord_bus::process::LogThrottle;
use fjord_config::ServerConfig;

/// Descriptors no client socket may take: the bus's connections, listeners, the runtime's
/// own, key fetches, logs.
const INTERNAL_FDS: u64 = 64;
/// The least share of descriptors kept from streams for everything else (health checks,
/// metrics scrapes, request heads in flight, preflights) and the internal ones.
const MIN_RESERVE: u64 = 128;

static REFUSALS: LogThrottle = LogThrottle::new(Duration::from_secs(10));

/// The limits of one server and what is open against them.
#[derive(Debug)]
pub(crate) struct Limits {
    max_streams: usize,
    per_address: Option<usize>,
    per_subject: Option<usize>,
    max_sockets: usize,
    state: Mutex<State>,
    /// Told each time a socket is given back.
    released: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct State {
    sockets: usize,
    streams: usize,
    by_address: HashMap<IpAddr, usize>,
    by_subject: HashMap<String, usize>,
    /// Sockets still sending their request head, oldest first: the ones given up when a
    /// new connection needs a descriptor.
    waiting: BTreeMap<u64, Arc<Notify>>,
    next_id: u64,
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Global,
    Address,
    Subject,
    Descriptors,
}

impl Limits {
    /// From the manifest's `server` section and the process's open-file limit (raised to its
    /// hard limit first).
    pub(crate) fn new(config: &ServerConfig, metrics: Arc<Metrics>) -> Self {
        Self::with_nofile(config, open_file_limit(), metrics)
    }

    fn with_nofile(config: &ServerConfig, nofile: u64, metrics: Arc<Metrics>) -> Self {
        let reserve = MIN_RESERVE.max(nofile / 20);
        let afforded = usize::try_from(nofile.saturating_sub(reserve))
            .unwrap_or(usize::MAX)
            .max(1);
        let max_sockets = usize::try_from(nofile.saturating_sub(INTERNAL_FDS))
            .unwrap_or(usize::MAX)
            .max(afforded + 1);
        let max_streams = match config.max_connections {
            Some(asked) if asked > afforded => {
                tracing::warn!(
                    max_connections = asked,
                    open_file_limit = nofile,
                    using = afforded,
                    "server.max_connections is more than the open-file limit allows with descriptors kept for health checks; raise the limit (ulimit -n, the task's nofile ulimit) to hold more"
                );
                afforded
            }
            Some(asked) => asked,
            None => afforded,
        };
        tracing::info!(
            max_connections = max_streams,
            max_connections_per_address = config.max_connections_per_address,
            max_connections_per_subject = config.max_connections_per_subject,
            open_file_limit = nofile,
            "connection limits"
        );
        metrics.connection_limit.store(max_streams as u64, Relaxed);
        Self {
            max_streams,
            per_address: config.max_connections_per_address,
            per_subject: config.max_connections_per_subject,
            max_sockets,
            state: Mutex::new(State::default()),
            released: Notify::new(),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A descriptor for a socket just accepted; when all are taken, the oldest socket still
    /// sending its head is given up for it, and only when there is none is it refused.
    pub(crate) fn accept(self: &Arc<Self>) -> Result<Slot, LimitReached> {
        let mut state = self.state();
        if state.sockets >= self.max_sockets {
            match state.waiting.pop_first() {
                // Counted until its task drops its slot, a moment later: the acceptor waits
                // for that (`room`) before it accepts another.
                Some((_, oldest)) => oldest.notify_one(),
                None => {
                    drop(state);
                    return Err(self.refuse(
                        Limit::Descriptors,
                        "the server has no file descriptor to spare for another connection".into(),
                    ));
                }
            }
        }
        state.sockets += 1;
        let id = state.next_id;
        state.next_id += 1;
        let given_up = Arc::new(Notify::new());
        state.waiting.insert(id, Arc::clone(&given_up));
        Ok(Slot {
            limits: Arc::clone(self),
            id,
            given_up: Some(given_up),
            address: None,
            subject: None,
        })
    }

    /// Resolves once the sockets given up for newer ones have closed: a socket given up is
    /// counted until its task drops it, a moment later, and accepting more meanwhile would
    /// take descriptors past the reserve under a churn of new connections.
    pub(crate) async fn room(&self) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.state().sockets <= self.max_sockets {
                return;
            }
            released.await;
        }
    }

    fn refuse(&self, limit: Limit, message: String) -> LimitReached {
        let (counter, name): (&AtomicU64, &str) = match limit {
            Limit::Global => (&self.metrics.refused_global, "global"),
            Limit::Address => (&self.metrics.refused_per_address, "address"),
            Limit::Subject => (&self.metrics.refused_per_subject, "subject"),
            Limit::Descriptors => (&self.metrics.refused_descriptors, "file_descriptors"),
        };
        counter.fetch_add(1, Relaxed);
        if let Some(held_back) = REFUSALS.admit() {
            tracing::warn!(limit = name, held_back, "{message}");
        }
        LimitReached(message)
    }
}

/// A connection refused at one of the limits (a 503 `too_many_connections` to the client,
/// with `Retry-After`): the message says which limit and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct LimitReached(pub(crate) String);

/// One accepted socket's share of the limits, given back when it is dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    limits: Arc<Limits>,
    id: u64,
    /// Set while the request head is being read.
    given_up: Option<Arc<Notify>>,
    /// Set once the socket counts as a stream.
    address: Option<IpAddr>,
    subject: Option<String>,
}

impl Slot {
    /// Resolves when this socket, still sending its head, is given up for a newer one.
    pub(crate) fn given_up(&self) -> impl Future<Output = ()> + use<> {
        let notify = self.given_up.clone();
        async move {
            match notify {
                Some(notify) => notify.notified().await,
                None => std::future::pending().await,
            }
        }
    }

    /// The request head has arrived: the socket is no longer given up for newer ones.
    pub(crate) fn head_read(&mut self) {
        if self.given_up.take().is_some() {
            self.limits.state().waiting.remove(&self.id);
        }
    }

    /// Counts this socket as a stream from `address`, or refuses it at the global or the
    /// per-address limit.
    pub(crate) fn admit_stream(&mut self, address: IpAddr) -> Result<(), LimitReached> {
        let limits = &self.limits;
        let mut state = limits.state();
        if state.streams >= limits.max_streams {
            drop(state);
            return Err(limits.refuse(
                Limit::Global,
                format!(
                    "this server holds its limit of {} streams; retry later or on another instance",
                    limits.max_streams
                ),
            ));
        }
        let from_address = state.by_address.get(&address).copied().unwrap_or(0);
        if let Some(limit) = limits.per_address.filter(|&limit| from_address >= limit) {
            drop(state);
            return Err(limits.refuse(
                Limit::Address,
                format!("too many streams from one address (the limit is {limit})"),
            ));
        }
        state.streams += 1;
        *state.by_address.entry(address).or_default() += 1;
        self.address = Some(address);
        Ok(())
    }

    /// Counts this stream against its token's subject, or refuses it at that limit.
    pub(crate) fn admit_subject(&mut self, subject: &str) -> Result<(), LimitReached> {
        let Some(limit) = self.limits.per_subject else {
            return Ok(());
        };
        let limits = &self.limits;
        let mut state = limits.state();
        if state.by_subject.get(subject).copied().unwrap_or(0) >= limit {
            drop(state);
            return Err(limits.refuse(
                Limit::Subject,
                format!("too many streams for this token's subject (the limit is {limit})"),
            ));
        }
        *state.by_subject.entry(subject.to_owned()).or_default() += 1;
        self.subject = Some(subject.to_owned());
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.limits.state();
        state.sockets -= 1;
        self.limits.released.notify_waiters();
        if self.given_up.is_some() {
            state.waiting.remove(&self.id);
        }
        if let Some(address) = self.address {
            state.streams -= 1;
            decrement(&mut state.by_address, &address);
        }
        if let Some(subject) = &self.subject {
            decrement(&mut state.by_subject, subject);
        }
    }
}

fn decrement<K, Q>(counts: &mut HashMap<K, usize>, key: &Q)
where
    K: Eq + std::hash::Hash + std::borrow::Borrow<Q>,
    Q: Eq + std::hash::Hash + ?Sized,
{
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

/// The process's open-file limit, first raised to its hard limit: a server holds one
/// descriptor per client, and the usual soft limit (1024) is far below what it can serve.
#[cfg(unix)]
fn open_file_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.maximum != limit.current {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(%error, "cannot raise the open-file limit to its hard limit");
        }
    }
    // `None` is unlimited.
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Where it cannot be read: the usual soft limit.
#[cfg(not(unix))]
fn open_file_limit() -> u64 {
    1024
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: &ServerConfig, nofile: u64) -> Arc<Limits> {
        Arc::new(Limits::with_nofile(config, nofile, Arc::default()))
    }

    #[test]
    fn streams_get_what_the_open_file_limit_affords_less_a_reserve() {
        assert_eq!(limits(&ServerConfig::default(), 256).max_streams, 128);
        assert_eq!(limits(&ServerConfig::default(), 20_000).max_streams, 19_000);
        let asked = |max| ServerConfig {
            max_connections: Some(max),
            ..ServerConfig::default()
        };
        assert_eq!(limits(&asked(50), 20_000).max_streams, 50);
        assert_eq!(limits(&asked(50_000), 20_000).max_streams, 19_000);
        assert_eq!(limits(&ServerConfig::default(), 10).max_streams, 1);
    }

    #[test]
    fn each_limit_refuses_and_a_closed_stream_gives_its_place_back() {
        let limits = limits(
            &ServerConfig {
                max_connections: Some(3),
                max_connections_per_address: Some(2),
                max_connections_per_subject: Some(1),
                ..ServerConfig::default()
            },
            20_000,
        );
        let one: IpAddr = [10, 0, 0, 1].into();
        let two: IpAddr = [10, 0, 0, 2].into();
        let stream = |address: IpAddr| {
            let mut slot = limits.accept().expect("a descriptor");
            slot.head_read();
            slot.admit_stream(address).map(|()| slot)
        };
        let first = stream(one).expect("first");
        let second = stream(one).expect("second");
        assert!(stream(one).is_err(), "a third from one address");
        let mut third = stream(two).expect("from another address");
        let error = stream(two).expect_err("over the global limit");
        assert!(error.0.contains("limit of 3 streams"), "{error}");
        drop(second);
        assert!(stream(one).is_ok(), "room again");

        third.admit_subject("alice").expect("alice's first");
        let mut fourth = stream(two).expect("room");
        assert!(fourth.admit_subject("alice").is_err());
        drop(third);
        fourth
            .admit_subject("alice")
            .expect("alice's place is free");
        drop(first);
        let metrics = &limits.metrics;
        assert_eq!(metrics.refused_per_address.load(Relaxed), 1);
        assert_eq!(metrics.refused_global.load(Relaxed), 1);
        assert_eq!(metrics.refused_per_subject.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn a_socket_still_sending_its_head_is_given_up_for_a_new_one() {
        let limits = limits(&ServerConfig::default(), 256);
        let mut slots: Vec<Slot> = (0..limits.max_sockets)
            .map(|_| limits.accept().expect("a descriptor"))
            .collect();
        for slot in &mut slots[1..] {
            slot.head_read();
        }
        let oldest = slots[0].given_up();
        let mut newest = limits.accept().expect("the oldest waiting one makes room");
        newest.head_read();
        tokio::time::timeout(Duration::from_secs(5), oldest)
            .await
            .expect("the oldest is told");
        slots.remove(0);
        let refused = limits.accept().expect_err("nothing left to give up");
        assert!(refused.0.contains("file descriptor"), "{refused}");
        assert_eq!(limits.metrics.refused_descriptors.load(Relaxed), 1);
        drop(newest);
        assert!(limits.accept().is_ok());
    }
}
