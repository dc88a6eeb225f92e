//! Overload. When a server cannot write its events as fast as they come, every connection
//! falls behind together, and all of them wait longer and longer. Rather than that, the hub
//! sheds connections, the furthest behind first, until the others are written within
//! `server.overload_wait_ms` again, and refuses new streams meanwhile (503, `Retry-After`):
//! a shed client reconnects, through the load balancer, to a server with room, and resumes
//! by id.
//!
//! The signal is how long the events that connections took had waited in their queues: not
//! bus or Kafka delays, which shedding would not help; not a connection still reading back
//! what it missed (its events wait for the replay); not a client that stopped reading
//! (it takes nothing, and its queue's bounds cut it off). A server is overloaded when, at
//! two looks in a row, at least [`MIN_BEHIND`] connections and [`BEHIND_SHARE`] of them took
//! an event since the last look that had waited longer than the bound: one slow client, or
//! one taking a burst, is not the server's overload.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use super::Hub;
use super::outlet::Frame;
use crate::keys::ClientId;
use crate::sse;
use fjord_bus::process::LogThrottle;

/// Fewer connections behind than this never make a server overloaded.
const MIN_BEHIND: usize = 16;
/// The share of the connections that must be behind, in percent.
const BEHIND_SHARE: usize = 5;
/// Checks in a row that must find the server behind before it counts as overloaded.
const CHECKS_BEHIND: u32 = 2;
/// The most connections shed at one check, in percent of all of them.
const SHED_SHARE: usize = 10;

/// Whether a hub is overloaded, as its last checks found it.
#[derive(Debug)]
pub(super) struct Overload {
    /// How long an event may wait in a live connection's queue; `None` never sheds.
    bound: Option<Duration>,
    /// Checks in a row that found the server behind.
    checks_behind: AtomicU32,
    overloaded: AtomicBool,
}

impl Overload {
    pub(super) fn new(bound: Option<Duration>) -> Self {
        Self {
            bound,
            checks_behind: AtomicU32::new(0),
            overloaded: AtomicBool::new(false),
        }
    }
}

impl Hub {
    /// Whether the server is shedding connections, and refuses new streams.
    pub fn is_overloaded(&self) -> bool {
        self.overload.overloaded.load(Relaxed)
    }

    /// Checks every `interval` whether the server keeps up, shedding connections while it
    /// does not; forever. Does nothing without a bound.
    pub async fn run_overload_checks(self: Arc<Self>, interval: Duration) {
        if self.overload.bound.is_none() {
            return;
        }
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.check_overload();
        }
    }

    /// One check: finds the live connections whose oldest event waited past the bound, and
    /// when enough have, at enough checks in a row, sheds the furthest behind of them.
    pub(super) fn check_overload(&self) {
        let Some(bound) = self.overload.bound else {
            return;
        };
        let mut connections = 0;
        let mut behind: Vec<(Duration, ClientId)> = Vec::new();
        self.index.for_each(|client, outlet| {
            connections += 1;
            let waited = outlet.take_worst_wait();
            if waited > bound {
                behind.push((waited, client));
            }
        });
        let is_behind =
            behind.len() >= MIN_BEHIND && behind.len() * 100 >= connections * BEHIND_SHARE;
        let checks = if is_behind {
            self.overload.checks_behind.fetch_add(1, Relaxed) + 1
        } else {
            self.overload.checks_behind.store(0, Relaxed);
            0
        };
        let overloaded = checks >= CHECKS_BEHIND;
        self.overload.overloaded.store(overloaded, Relaxed);
        if !overloaded {
            return;
        }
        let shed = behind.len().min((connections * SHED_SHARE).div_ceil(100));
        behind.select_nth_unstable_by(shed.saturating_sub(1), |a, b| b.0.cmp(&a.0));
        let notice = Arc::new(sse::notice(
            sse::reserved::SHUTDOWN,
            &serde_json::json!({"reason": "server overloaded; reconnect"}),
        ));
        let mut shed_count = 0_u64;
        for &(_, client) in &behind[..shed] {
            if self
                .index
                .remove(client, Some(Frame::Raw(Arc::clone(&notice))))
            {
                shed_count += 1;
            }
        }
        self.metrics.clients_shed.fetch_add(shed_count, Relaxed);
        static SHEDDING: LogThrottle = LogThrottle::new(Duration::from_secs(10));
        if let Some(held_back) = SHEDDING.admit() {
            tracing::warn!(
                connections,
                behind = behind.len(),
                shed = shed_count,
                bound_ms = bound.as_millis(),
                held_back,
                "overloaded: events wait longer than server.overload_wait_ms; shedding the connections furthest behind and refusing new streams"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use futures_util::{FutureExt, StreamExt};

    use super::super::testing::{entry, hub, live, next_text};
    use crate::hub::{Hub, Outgoing, Subscription};

    /// Takes what `client` has queued now: its text, and whether its stream goes on.
    fn take(client: &mut Subscription) -> (String, bool) {
        let mut text = String::new();
        loop {
            match client.next().now_or_never() {
                Some(Some(Outgoing::Events(bytes))) => {
                    text.push_str(&String::from_utf8_lossy(&bytes))
                }
                Some(Some(Outgoing::Unfinished)) => {}
                Some(None) => return (text, false),
                None => return (text, true),
            }
        }
    }

    /// `count` connections of `orders`, past their prelude.
    async fn connections(hub: &std::sync::Arc<Hub>, count: usize) -> Vec<Subscription> {
        let mut clients = Vec::with_capacity(count);
        for _ in 0..count {
            let mut client = hub.subscribe(live(vec![1]), None, None);
            next_text(&mut client).await;
            clients.push(client);
        }
        clients
    }

    /// An event for everyone; `late` of `clients` take it after 300 ms, the others after 100.
    async fn a_round(
        hub: &Hub,
        ms: u64,
        clients: &mut [Subscription],
        late: std::ops::Range<usize>,
    ) {
        hub.dispatch(&[(1, entry(ms, "a"))]);
        tokio::time::advance(Duration::from_millis(100)).await;
        for (i, client) in clients.iter_mut().enumerate() {
            if !late.contains(&i) {
                take(client);
            }
        }
        tokio::time::advance(Duration::from_millis(200)).await;
        for client in &mut clients[late] {
            take(client);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_overloaded_hub_sheds_the_connections_furthest_behind() {
        let hub = hub(1024);
        let mut clients = connections(&hub, 100).await;
        // 60 of 100 take their events 300 ms late, past the bound of 250; the rest in time.
        a_round(&hub, 10, &mut clients, 40..100).await;
        hub.check_overload();
        assert!(!hub.is_overloaded(), "one look behind is not yet overload");
        a_round(&hub, 11, &mut clients, 40..100).await;
        hub.check_overload();
        assert!(hub.is_overloaded());
        // A tenth of them shed, all from those behind, each with a notice.
        let shed: Vec<usize> = (0..100)
            .filter(|&i| {
                let (text, open) = take(&mut clients[i]);
                assert_eq!(text.contains("server overloaded"), !open, "{i}: {text}");
                !open
            })
            .collect();
        assert_eq!(shed.len(), 10, "{shed:?}");
        assert!(shed.iter().all(|&i| i >= 40), "{shed:?}");
        assert_eq!(hub.metrics().clients_shed.load(Relaxed), 10);
        // The others caught up: at the next look the server is no longer overloaded.
        a_round(&hub, 12, &mut clients, 0..0).await;
        hub.check_overload();
        assert!(!hub.is_overloaded());
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_clients_few_late_ones_or_one_late_look_are_not_overload() {
        let hub = hub(1024);
        let mut clients = connections(&hub, 400).await;
        // 100 clients that stopped reading take nothing, however old their events grow;
        // the other 300 take theirs in time.
        for round in 0..4 {
            a_round(&hub, 10 + round, &mut clients[100..], 0..0).await;
            hub.check_overload();
            assert!(!hub.is_overloaded(), "round {round}");
        }
        // 15 of the readers late (fewer than 16), then 19 of 400 (under 5 %).
        for late in [15, 19] {
            for _ in 0..3 {
                a_round(&hub, 20 + late as u64, &mut clients[100..], 0..late).await;
                hub.check_overload();
                assert!(!hub.is_overloaded(), "{late} late");
            }
        }
        // One look with every reading client late, between looks in time: not overloaded.
        a_round(&hub, 40, &mut clients[100..], 0..300).await;
        hub.check_overload();
        a_round(&hub, 41, &mut clients[100..], 0..0).await;
        hub.check_overload();
        assert!(!hub.is_overloaded());
    }
}
