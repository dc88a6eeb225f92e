//! A running `fjord-server`: reads the bus into the hub, serves the routes, sends the
//! heartbeats, and on shutdown drains — tells every client to reconnect elsewhere, stops
//! accepting, and exits within the grace period. A failed accept (out of descriptors, most
//! often) is logged at a bounded rate and backed off from, never spun on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::auth::Authenticator;
use crate::connection::{self, Fallback, Prefixed};
use crate::cors::Cors;
use crate::http::Readiness;
pub use crate::http::StaticFile;
use crate::hub::{Hub, HubEndpoint};
use crate::limits::Limits;
use crate::metrics::{EmfTarget, Metrics};
use crate::request::Admission;
use fjord_bus::backoff::Backoff;
use fjord_bus::process::LogThrottle;
use fjord_bus::{Bus, BusError};
use fjord_config::ManifestError;
use fjord_config::{AuthConfig, EndpointMode, Manifest, MetricsListener};

/// How long a draining server waits for its connections to close; below ECS's 30 s
/// default stop timeout.
pub const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// Connections the kernel completes and holds for the server to accept. Tokio's default,
/// 1,024, overflowed while a million clients connected to 55 busy servers (the kernel
/// then drops the handshake and the client waits out its retransmissions); a server that
/// restarts meets the same storm when all its clients come back. Linux caps it at
/// `net.core.somaxconn` (4,096 by default).
const ACCEPT_BACKLOG: u32 = 4096;

/// How often the open-connections metric goes to CloudWatch.
const EMF_INTERVAL: Duration = Duration::from_secs(60);
/// How often the hub checks whether it keeps up (`hub::overload`): two checks behind in a
/// row make it shed, so it reacts within a second.
const OVERLOAD_CHECKS: Duration = Duration::from_millis(500);
/// The first wait after a failed accept; it doubles with each failure in a row, up to
/// [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The bus could not be read.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A key or secret the manifest names could not be loaded.
    #[error(transparent)]
    Auth(#[from] ManifestError),
    /// An endpoint's filter does not compile (a manifest that was not validated).
    #[error("endpoints.{endpoint}.filter is not a filter")]
    Filter {
        /// The endpoint.
        endpoint: String,
        /// Where and why.
        source: fjord_config::FilterError,
    },
    /// The port could not be bound.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A server ready to serve: its keys and secrets loaded, then its port bound.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    auth: Authenticator,
    consumer: Option<tokio::sync::watch::Receiver<Option<&'static str>>>,
}

impl Bound {
    /// Makes `/readyz` say, besides the bus, why a consumer of the same process is not
    /// consuming (`fjord dev`): `consumer` is what its member sets, `None` while it is.
    pub fn ready_while_consumer_consumes(
        mut self,
        consumer: tokio::sync::watch::Receiver<Option<&'static str>>,
    ) -> Self {
        self.consumer = Some(consumer);
        self
    }

    /// The address it listens on (the port the OS chose, for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Loads the keys and secrets that access control needs, then binds the manifest's
/// `server.host` (see [`Manifest::server_host`]) and `server.port`: a manifest whose secret
/// is refused never holds the port, even for a moment.
pub async fn bind(manifest: &Manifest) -> Result<Bound, ServerError> {
    let auth = Authenticator::new(&manifest.auth, &manifest.server.filter_limits).await?;
    let address = SocketAddr::new(manifest.server_host(), manifest.server.port);
    let listener = listen(address).map_err(|source| ServerError::Bind { address, source })?;
    Ok(Bound {
        listener,
        auth,
        consumer: None,
    })
}

/// A listener on `address` with room for [`ACCEPT_BACKLOG`] connections not yet accepted.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted server rebinds despite TIME_WAIT sockets.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Serves until `shutdown` resolves, then drains.
pub async fn serve(
    manifest: &Manifest,
    bus: &Bus,
    bound: Bound,
    static_files: &'static [StaticFile],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let mut running = Running::build(manifest, bus, bound, static_files).await?;
    running.accept_until(shutdown).await;
    running.drain().await;
    Ok(())
}

/// A server built from its manifest: the hub fed from the bus, the routes, the limits and
/// the tasks that run beside them, ready to accept connections.
struct Running {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    admission: Arc<Admission>,
    fallback: Fallback,
    acceptor: Acceptor,
    /// The metrics listener's task, if `server.metrics_listener` asks for one.
    probes: Option<JoinHandle<()>>,
    /// The tasks that run as long as the server does; dropped, the set ends them.
    background: JoinSet<()>,
    /// Every connection task holds a receiver; the drain waits until all are gone.
    connections_open: tokio::sync::watch::Sender<()>,
}

impl Running {
    /// Starts reading the bus into a new hub, with its heartbeats, expiries and metrics
    /// export, and makes the routes; binds the metrics listener if the manifest has one.
    async fn build(
        manifest: &Manifest,
        bus: &Bus,
        bound: Bound,
        static_files: &'static [StaticFile],
    ) -> Result<Self, ServerError> {
        let Bound {
            listener,
            auth,
            consumer,
        } = bound;
        let reader = bus
            .reader(manifest.endpoints.keys().cloned().collect())
            .await?;
        let metrics = Arc::new(Metrics::default());
        let endpoints = manifest
            .endpoints
            .iter()
            .map(|(name, endpoint)| {
                let filter = endpoint
                    .filter(&manifest.server.filter_limits)
                    .map_err(|source| ServerError::Filter {
                        endpoint: name.as_str().to_owned(),
                        source,
                    })?;
                Ok(HubEndpoint {
                    name: name.clone(),
                    start: endpoint.start,
                    filter,
                    table: endpoint.mode == EndpointMode::Table,
                })
            })
            .collect::<Result<Vec<_>, ServerError>>()?;
        let hub = Arc::new(Hub::new(
            endpoints,
            reader.cursors(),
            &manifest.server,
            bus.clone(),
            Arc::clone(&metrics),
        ));
        let mut background = JoinSet::new();
        background.spawn(Arc::clone(&hub).run_feed(reader));
        background.spawn(Arc::clone(&hub).run_heartbeats(manifest.server.heartbeat()));
        background.spawn(Arc::clone(&hub).run_expiries(Duration::from_secs(1)));
        background.spawn(Arc::clone(&hub).run_overload_checks(OVERLOAD_CHECKS));
        if let Some(target) = EmfTarget::from_env() {
            background.spawn(target.run(Arc::clone(&metrics), EMF_INTERVAL));
        }

        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, endpoints = hub.endpoints().len(), "fjord-server listening");
        }
        let limits = Arc::new(Limits::new(&manifest.server, Arc::clone(&metrics)));
        // Cookies are the one credential a browser sends by itself, and only where allowed to.
        let cookies = matches!(&manifest.auth, AuthConfig::Jwt(jwt) if jwt.token_cookie.is_some());
        let cors = Cors::new(&manifest.server.cors_origins, cookies);
        let admission = Arc::new(Admission {
            hub: Arc::clone(&hub),
            auth,
            cors: cors.clone(),
            trust_forwarded_for: manifest.server.trust_forwarded_for,
            compression: manifest.server.compression,
        });
        let readiness = Readiness {
            hub: Arc::clone(&hub),
            consumer,
        };
        let fallback = fallback(crate::http::routes(
            &readiness,
            &manifest.server,
            cors,
            static_files,
        ));
        let probes = match &manifest.server.metrics_listener {
            Some(config) => Some(spawn_probes(config, &readiness, &metrics).await?),
            None => None,
        };
        Ok(Self {
            acceptor: Acceptor::new(listener, Arc::clone(&metrics)),
            hub,
            metrics,
            limits,
            admission,
            fallback,
            probes,
            background,
            connections_open: tokio::sync::watch::channel(()).0,
        })
    }

    /// Accepts connections, each served on a task of its own, until `shutdown` resolves.
    async fn accept_until(&mut self, shutdown: impl Future<Output = ()>) {
        let Self {
            metrics,
            limits,
            admission,
            fallback,
            acceptor,
            connections_open,
            ..
        } = self;
        tokio::pin!(shutdown);
        loop {
            let (socket, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = async {
                    limits.room().await;
                    acceptor.accept().await
                } => accepted,
            };
            let slot = match limits.accept() {
                Ok(slot) => slot,
                Err(refusal) => {
                    connection::refuse(&socket, metrics, &refusal.into());
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            tokio::spawn(connection::serve(
                socket,
                peer,
                slot,
                Arc::clone(admission),
                Arc::clone(fallback),
                connections_open.subscribe(),
            ));
        }
    }

    /// Stops listening, tells every client to reconnect elsewhere, and waits for their
    /// connections to close, at most [`DRAIN_GRACE`]; then ends the background tasks.
    async fn drain(mut self) {
        drop(self.acceptor);
        if let Some(probes) = self.probes {
            probes.abort();
        }
        tracing::info!("draining: telling clients to reconnect elsewhere");
        self.hub.drain();
        tokio::select! {
            () = self.connections_open.closed() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(DRAIN_GRACE) => tracing::warn!("connections still open after the grace period; exiting"),
        }
        self.background.shutdown().await;
    }
}

/// Accepts connections; a failed accept is logged at a bounded rate and waited out, longer
/// with each failure in a row, instead of being retried at once.
struct Acceptor {
    listener: TcpListener,
    backoff: Backoff,
    metrics: Arc<Metrics>,
}

static ACCEPT_FAILURES: LogThrottle = LogThrottle::new(Duration::from_secs(10));

impl Acceptor {
    fn new(listener: TcpListener, metrics: Arc<Metrics>) -> Self {
        Self {
            listener,
            backoff: Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX),
            metrics,
        }
    }

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff.reset();
                    return accepted;
                }
                Err(error) => {
                    self.metrics.accept_errors.fetch_add(1, Relaxed);
                    let retry_in = self.backoff.next_delay();
                    if let Some(held_back) = ACCEPT_FAILURES.admit() {
                        tracing::warn!(
                            %error,
                            held_back,
                            backoff_ms = retry_in.as_millis(),
                            "accept failed; waiting for connections to close"
                        );
                    }
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }
}

/// Binds the metrics listener, and serves health, readiness and metrics there, one request
/// per connection, until the task is aborted.
async fn spawn_probes(
    config: &MetricsListener,
    readiness: &Readiness,
    metrics: &Arc<Metrics>,
) -> Result<JoinHandle<()>, ServerError> {
    let address = SocketAddr::new(config.host, config.port);
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| ServerError::Bind { address, source })?;
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "metrics listening");
    }
    let probes = fallback(crate::http::probe_routes(readiness));
    let mut acceptor = Acceptor::new(listener, Arc::clone(metrics));
    Ok(tokio::spawn(async move {
        loop {
            let (socket, _) = acceptor.accept().await;
            tokio::spawn(probes(Prefixed::new(Vec::new(), socket)));
        }
    }))
}

/// hyper with warp's routes, for every request that is not a stream: one request per
/// connection, so that a stream request always reaches [`connection`].
fn fallback(
    routes: impl warp::Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
    + Clone
    + Send
    + Sync
    + 'static,
) -> Fallback {
    let service = warp::service(routes);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(connection::MAX_HEAD)
        .keep_alive(false)
        .timer(TokioTimer::new());
    Arc::new(move |socket| {
        let served = http.serve_connection(
            TokioIo::new(socket),
            TowerToHyperService::new(service.clone()),
        );
        Box::pin(async move {
            if let Err(error) = served.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        })
    })
}
