//! Running the server, with graceful shutdown. On the shutdown signal `/readyz` turns 503 and
//! the gateway keeps serving for `shutdown_delay_secs`, every answer with `Connection: close`, so
//! that load balancers (a Kubernetes Service's endpoints) stop sending to it and keep-alive
//! clients move to another replica while nothing is refused. Then the listener stops accepting,
//! idle keep-alive connections are closed, and in-flight requests and shadow runs get up to
//! `shutdown_grace_secs` to finish.
//!
//! The accept loop is ours rather than `axum::serve`'s so that each connection gets a timer: a
//! client must send its request headers within `header_timeout_secs` or the connection is closed
//! (slow-header clients would otherwise hold connections for ever). hyper restarts that timer
//! whenever a keep-alive connection goes idle, so it is also the idle timeout: keep it longer than
//! the idle timeout of the proxy in front (documented defaults: 60 s for nginx's upstream keep-alive and AWS load balancers), or the proxy
//! may send a request on a connection the gateway is closing. At most
//! `admission.max_connections` connections are open at once; past that the gateway stops
//! accepting (the kernel's backlog holds the rest) until one closes. The peer address goes into
//! each request as `ConnectInfo`, the rate limiter's last resort for telling clients apart.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::routes::router;
use crate::state::AppState;

pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = Duration::from_secs_f64(state.config.shutdown_grace_secs);
    let header_timeout = Duration::from_secs_f64(state.config.header_timeout_secs);
    let app = router(state.clone());
    let _state_monitor = AbortOnDrop(tokio::spawn(state.shared.clone().monitor()));
    let _record_retries = state
        .experiments
        .store
        .as_ref()
        .map(|s| AbortOnDrop(tokio::spawn(s.writer.clone().run())));
    let _watcher = AbortOnDrop(tokio::spawn(crate::auth::watch_keys_file(state.clone())));
    let _pruner = AbortOnDrop(tokio::spawn(crate::experiments::prune_periodically(
        state.clone(),
    )));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(
        state.config.admission.max_connections,
    ));
    let delay = Duration::from_secs_f64(state.config.shutdown_delay_secs);
    let mut shutdown = std::pin::pin!(shutdown);
    // Set when the shutdown signal came: accepting stops then.
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        let stop = async {
            match stop_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let accept = async {
            let permit = connections.clone().acquire_owned().await;
            (permit, listener.accept().await)
        };
        let (permit, stream, peer) = tokio::select! {
            (permit, accepted) = accept => match (permit, accepted) {
                (Ok(p), Ok((stream, peer))) => (p, stream, peer),
                (_, Err(e)) if is_connection_error(&e) => continue,
                (_, Err(e)) => {
                    // Out of file descriptors and the like: wait rather than spin on it.
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                (Err(_), Ok(_)) => continue,
            },
            () = &mut shutdown, if stop_at.is_none() => {
                state.start_draining();
                tracing::info!(?delay, "shutting down: /readyz answers 503; still serving until the delay is over");
                stop_at = Some(tokio::time::Instant::now() + delay);
                continue;
            }
            () = stop => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
            drop(permit);
        });
    }
    state.start_draining();
    drop(listener);
    tracing::info!("shutting down: no longer accepting; draining in-flight requests");
    let drain = async {
        // Idle keep-alive connections are closed; busy ones after their answer.
        graceful.shutdown().await;
        state.background.close();
        state.background.wait().await;
    };
    tokio::select! {
        () = drain => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "grace period over; abandoning the remaining requests");
        }
    }
    // Experiment records still waiting for the database: one last try, then their count in the
    // log (bounded by the storage timeout per record it writes).
    if let Some(store) = &state.experiments.store {
        store.writer.finish().await;
    }
    Ok(())
}

/// The peer's doing (it went away during the handshake): nothing to report or wait for.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Stops a background task when the server future ends or is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves on SIGINT or SIGTERM. The SIGTERM handler is installed when this is called, not
/// when the future is first polled: called before the gateway says it is listening, a SIGTERM
/// that follows at once drains it instead of killing it (a test saw that race under load).
/// Must be called inside the tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async move {
            match term {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    }
}
