//! A running `fjord-server`: reads the bus into the hub, serves the routes, sends the
//! heartbeats, and on shutdown drains — tells every client to reconnect elsewhere, stops
//! accepting, and exits within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::bus::{Bus, BusError};
use crate::config::Manifest;
use crate::config::ManifestError;
use crate::http::StaticFile;
use crate::hub::Hub;
use crate::metrics::{EmfTarget, Metrics};

/// How long a draining server waits for its connections to close; below ECS's 30 s
/// default stop timeout.
pub const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// hyper's read buffer per connection: its smallest allowed maximum.
const MAX_BUFFER: usize = 8192;

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
    let routes = crate::http::routes(&hub, &auth, &manifest.server, static_files);
    let service = warp::service(routes);
    // hyper's HTTP/1 connection directly, rather than `warp::serve`'s HTTP/1-or-2 sniffing
    // builder: smaller per connection, and no HTTP/2 or upgrades that SSE does not use.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(MAX_BUFFER)
        .writev(true)
        .timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: wait for connections to close.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(service.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("draining: telling clients to reconnect elsewhere");
    hub.drain();
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
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
