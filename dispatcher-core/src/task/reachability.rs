//! Whether the dispatcher server answers, and how long a worker waits
//! before it calls again: backing off while it is unreachable, giving up
//! once it has been gone too long.

use std::time::Duration;

use tokio::time::Instant;

use super::manager::ManagerConfig;

/// The first wait after a failed call to the server; it doubles up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Whether the server answers, and how long to wait before calling again.
#[derive(Debug)]
pub(super) struct Reachability {
    /// Whether it ever answered. A server that did and then stops answering
    /// finished its job and exited (or died with it): it is given up on sooner
    /// than one never reached, which may still be starting.
    ever_reached: bool,
    /// Since when every call failed to reach it.
    unreachable_since: Option<Instant>,
    /// The wait after the next failure.
    backoff: Duration,
}

impl Reachability {
    pub(super) fn new() -> Reachability {
        Reachability {
            ever_reached: false,
            unreachable_since: None,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The server answered.
    pub(super) fn answered(&mut self) {
        self.ever_reached = true;
        self.unreachable_since = None;
        self.backoff = FIRST_BACKOFF;
    }

    /// The server could not be reached at `now`: how long to wait before the
    /// next try, or `None` when it has been unreachable too long to wait more.
    pub(super) fn unreachable(&mut self, now: Instant, config: &ManagerConfig) -> Option<Duration> {
        let limit = if self.ever_reached {
            config.vanish_wait
        } else {
            config.server_wait
        };
        let since = *self.unreachable_since.get_or_insert(now);
        if now.duration_since(since) >= limit {
            tracing::warn!(
                secs = limit.as_secs(),
                "the dispatcher server is gone; finishing"
            );
            return None;
        }
        let wait = self.next_backoff();
        tracing::debug!(
            backoff_ms = wait.as_millis() as u64,
            "the dispatcher server is unreachable; retrying"
        );
        Some(wait)
    }

    /// The wait after a failed call, doubling with each one.
    pub(super) fn next_backoff(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (wait * 2).min(MAX_BACKOFF);
        wait
    }

    pub(super) fn is_unreachable(&self) -> bool {
        self.unreachable_since.is_some()
    }
}
