//! Accepting and serving connections, with the limits a server of a thousand
//! workers needs and `axum::serve` does not give:
//!
//! - every read and write must make progress within the idle timeout, so an
//!   idle keep-alive connection, a request whose headers or body stopped
//!   halfway (a worker node that died mid-POST), or a peer that stopped reading
//!   is closed rather than kept forever; TCP keepalive finds peers that vanished
//!   without a word even sooner on an otherwise idle connection;
//! - at most `max_connections` are open at once, a margin below the open-file
//!   limit, so that the output, checkpoints and the spill file always have
//!   descriptors; past it the next connection waits in the kernel's backlog
//!   until one closes;
//! - an accept that fails for want of descriptors (EMFILE, ENFILE) or memory
//!   backs off and tries again instead of ending the server;
//! - on shutdown, idle connections close at once, requests under way may
//!   finish, and whatever is still open after the shutdown deadline is dropped,
//!   so that no connection can keep the process alive.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_io_timeout::TimeoutStream;

/// Descriptors kept free below the open-file limit for the job's own files.
pub const RESERVED_FDS: u64 = 64;

/// The limits of [`serve_connections`].
#[derive(Debug, Clone)]
pub(super) struct ConnectionLimits {
    /// Longest a read or a write may make no progress, and longest a request's
    /// headers may take.
    pub(super) idle_timeout: Duration,
    /// Connections open at once at most.
    pub(super) max_connections: usize,
    /// How long connections may take to finish once the server stops.
    pub(super) shutdown_timeout: Duration,
}

/// Serves `router` on every connection `listener` accepts until `stopping`
/// turns true, then winds the connections down within the shutdown timeout.
pub(super) async fn serve_connections(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    mut stopping: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut backoff = Backoff::default();
    loop {
        // Reap finished connections without waiting.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = stopped(&mut stopping) => break,
            // At the cap, wait for a connection to close before accepting.
            Some(_) = connections.join_next(), if connections.len() >= limits.max_connections => continue,
            accepted = listener.accept(), if connections.len() < limits.max_connections => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(e) => {
                let wait = backoff.next();
                if is_resource_shortage(&e) {
                    tracing::warn!(
                        open = connections.len(),
                        wait_ms = wait.as_millis() as u64,
                        "cannot accept a connection: {e}; waiting for descriptors to free"
                    );
                    tokio::time::sleep(wait).await;
                } else {
                    // The peer gave up before it was accepted (ECONNABORTED and
                    // the like): nothing to do but accept the next one.
                    tracing::debug!("accept failed: {e}");
                }
                continue;
            }
        };
        connections.spawn(serve_one(
            stream,
            peer,
            router.clone(),
            limits.idle_timeout,
            stopping.clone(),
        ));
    }
    drop(listener);
    // Every connection saw `stopping` too and is closing: idle ones at once,
    // busy ones after their request. Those that do not close in time are
    // dropped with the runtime's next turn.
    let open = connections.len();
    if open > 0
        && tokio::time::timeout(limits.shutdown_timeout, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            of = open,
            secs = limits.shutdown_timeout.as_secs_f64(),
            "connections still open after the shutdown timeout; closing them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// Serves one connection until it closes, times out, or the server stops.
async fn serve_one(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    idle_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    if let Err(e) = configure(&stream) {
        tracing::debug!(%peer, "could not set socket options: {e}");
    }
    let mut io = TimeoutStream::new(stream);
    io.set_read_timeout(Some(idle_timeout));
    io.set_write_timeout(Some(idle_timeout));
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        tower_service::Service::call(&mut router.clone(), request)
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .serve_connection(TokioIo::new(Box::pin(io)), service);
    let mut connection = std::pin::pin!(connection);
    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        () = stopped(&mut stopping) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = outcome {
        tracing::debug!(%peer, "connection closed: {e}");
    }
}

/// Resolves once the server stops (or its stop signal is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// TCP keepalive (probe after 60 s of silence, every 10 s, give up after 6)
/// and no Nagle delay on an accepted socket.
fn configure(stream: &TcpStream) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(6),
    )
}

/// Whether an accept failed for want of descriptors or memory, which frees up
/// as connections close.
fn is_resource_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Waits between failed accepts: 10 ms doubling to 1 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(10))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (wait * 2).min(Duration::from_secs(1));
        wait
    }

    fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Raises the soft open-file limit to the hard one, so that thousands of
/// worker connections fit, and returns `(soft before, soft now)`.
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
    }
    let (now, _) = rlimit::Resource::NOFILE.get()?;
    Ok((soft, now))
}

/// The default `--max-connections`: the open-file limit less a reserve for the
/// job's files.
pub fn default_max_connections() -> usize {
    let soft = rlimit::Resource::NOFILE
        .get()
        .map_or(1024, |(soft, _)| soft);
    soft.saturating_sub(RESERVED_FDS).max(1) as usize
}
