//! A running `fjord-server`: reads the bus into the hub, serves the routes, sends the
//! heartbeats, and on shutdown drains — tells every client to reconnect elsewhere, stops
//! accepting, and exits within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    let draining_hub = Arc::clone(&hub);
    let (drain_started, drain_started_rx) = tokio::sync::oneshot::channel::<()>();
    let server = warp::serve(routes).incoming(listener).graceful(async move {
        shutdown.await;
        tracing::info!("draining: telling clients to reconnect elsewhere");
        draining_hub.drain();
        let _ = drain_started.send(());
    });
    let grace_expired = async move {
        if drain_started_rx.await.is_ok() {
            tokio::time::sleep(DRAIN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = server.run() => tracing::info!("all connections closed"),
        () = grace_expired => tracing::warn!("connections still open after the grace period; exiting"),
    }
    feed.abort();
    heartbeats.abort();
    expiries.abort();
    if let Some(emf) = emf {
        emf.abort();
    }
    Ok(())
}
