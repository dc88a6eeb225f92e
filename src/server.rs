//! A running `fjord-server`: reads the bus into the hub, serves the routes, sends the
//! heartbeats, and on shutdown drains — tells every client to reconnect elsewhere, stops
//! accepting, and exits within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::bus::{Bus, BusError};
use crate::config::Manifest;
use crate::config::ManifestError;
use crate::connection::{self, Fallback, StreamService};
use crate::http::{Cors, StaticFile};
use crate::hub::Hub;
use crate::metrics::{EmfTarget, Metrics};

/// How long a draining server waits for its connections to close; below ECS's 30 s
/// default stop timeout.
pub const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// How often the open-connections metric goes to CloudWatch.
const EMF_INTERVAL: Duration = Duration::from_secs(60);

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The bus could not be read.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A key or secret the manifest names could not be loaded.
    #[error(transparent)]
    Auth(#[from] ManifestError),
    /// The port could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds the manifest's `server.host` and `server.port`.
pub async fn bind(manifest: &Manifest) -> Result<TcpListener, ServerError> {
    let address = SocketAddr::new(manifest.server.host, manifest.server.port);
    TcpListener::bind(address)
        .await
        .map_err(|source| ServerError::Bind { address, source })
}

/// Serves until `shutdown` resolves, then drains.
pub async fn serve(
    manifest: &Manifest,
    bus: &Bus,
    listener: TcpListener,
    static_files: &'static [StaticFile],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let auth = Authenticator::new(&manifest.auth).await?;
    let reader = bus
        .reader(manifest.endpoints.keys().cloned().collect())
        .await?;
    let metrics = Arc::new(Metrics::default());
    let endpoints = manifest
        .endpoints
        .iter()
        .map(|(name, endpoint)| (name.clone(), endpoint.start))
        .collect();
    let hub = Arc::new(Hub::new(
        endpoints,
        reader.cursors(),
        &manifest.server,
        bus.clone(),
        Arc::clone(&metrics),
    ));
    let feed = tokio::spawn(Arc::clone(&hub).run_feed(reader));
    let heartbeats = tokio::spawn(Arc::clone(&hub).run_heartbeats(manifest.server.heartbeat()));
    let expiries = tokio::spawn(Arc::clone(&hub).run_expiries(Duration::from_secs(1)));
    let emf = EmfTarget::from_env()
        .map(|target| tokio::spawn(target.run(Arc::clone(&metrics), EMF_INTERVAL)));

    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, endpoints = hub.endpoints().len(), "fjord-server listening");
    }
    let streams = Arc::new(StreamService {
        hub: Arc::clone(&hub),
        auth,
        cors: Cors::new(&manifest.server.cors_origins),
    });
    let fallback = fallback(crate::http::routes(&hub, &manifest.server, static_files));
    // Every connection task holds a receiver; the drain waits until all are gone.
    let (connections_open, _) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let socket = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(error) => {
                    // Out of file descriptors, most likely: wait for connections to close.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let open = connections_open.subscribe();
        let served = connection::serve(socket, Arc::clone(&streams), Arc::clone(&fallback));
        tokio::spawn(async move {
            served.await;
            drop(open);
        });
    }
    drop(listener);
    tracing::info!("draining: telling clients to reconnect elsewhere");
    hub.drain();
    tokio::select! {
        () = connections_open.closed() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(DRAIN_GRACE) => tracing::warn!("connections still open after the grace period; exiting"),
    }
    feed.abort();
    heartbeats.abort();
    expiries.abort();
    if let Some(emf) = emf {
        emf.abort();
    }
    Ok(())
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
