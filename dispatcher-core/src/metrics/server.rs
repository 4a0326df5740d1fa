//! The server's metrics, rendered from the ledger's status at scrape time.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{latency_histogram, text, KindLabel, UNLISTED_KIND};
use crate::ledger::LedgerStats;
use crate::protocol::GroupStatus;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    to: String,
}

/// The server's metrics. Counts come from the ledger's status at scrape time
/// (counters advance by the difference since the last scrape), so the ledger's
/// hot path carries no metrics code; request latencies are recorded per request.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    issued: Counter,
    completed: Counter,
    reissues: Family<CauseLabel, Counter>,
    tombstones: Counter,
    failed: Family<KindLabel, Counter>,
    ignored: Counter,
    lines_done: Gauge,
    in_flight: Gauge,
    queued: Gauge,
    reorder_lines: Gauge,
    reorder_bytes: Gauge,
    workers_seen: Gauge,
    workers_active: Gauge,
    journal_entries: Gauge,
    journal_bytes: Gauge,
    journal_replayed: Counter,
    journal_tokens_saved: Counter,
    group_waiting: Gauge,
    group_keys: Gauge,
    group_issued: Family<GroupLabel, Counter>,
    /// One histogram per endpoint, created up front (children of one family),
    /// so recording a request takes no lock or allocation.
    latency: [Histogram; Endpoint::ALL.len()],
    /// The status at the last scrape, to advance counters by differences.
    last: Mutex<Option<LedgerStats>>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dispatcher");
        let m = ServerMetrics {
            issued: Counter::default(),
            completed: Counter::default(),
            reissues: Family::default(),
            tombstones: Counter::default(),
            failed: Family::default(),
            ignored: Counter::default(),
            lines_done: Gauge::default(),
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            reorder_lines: Gauge::default(),
            reorder_bytes: Gauge::default(),
            workers_seen: Gauge::default(),
            workers_active: Gauge::default(),
            journal_entries: Gauge::default(),
            journal_bytes: Gauge::default(),
            journal_replayed: Counter::default(),
            journal_tokens_saved: Counter::default(),
            group_waiting: Gauge::default(),
            group_keys: Gauge::default(),
            group_issued: Family::default(),
            latency: std::array::from_fn(|_| latency_histogram()),
            last: Mutex::new(None),
            registry: Registry::default(),
        };
        let family: Family<EndpointLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let latency = std::array::from_fn(|i| {
            family
                .get_or_create(&EndpointLabel {
                    endpoint: Endpoint::ALL[i].path().to_string(),
                })
                .clone()
        });
        registry.register(
            "items_issued",
            "Items handed to workers, reissues included",
            m.issued.clone(),
        );
        registry.register(
            "items_completed",
            "Results accepted (first result of an item)",
            m.completed.clone(),
        );
        registry.register(
            "reissues",
            "Items put back for another issue, by cause",
            m.reissues.clone(),
        );
        registry.register(
            "tombstones",
            "Items given up after --max-retries reissues",
            m.tombstones.clone(),
        );
        registry.register(
            "failed_lines",
            "Failed output lines written by this run (results, tombstones, invalid input lines), by kind",
            m.failed.clone(),
        );
        registry.register(
            "ignored_results",
            "Duplicate results and results for unknown ids",
            m.ignored.clone(),
        );
        registry.register("lines_done", "Output lines written", m.lines_done.clone());
        registry.register(
            "in_flight",
            "Items issued and not answered",
            m.in_flight.clone(),
        );
        registry.register(
            "queued_for_reissue",
            "Items waiting to be issued again",
            m.queued.clone(),
        );
        registry.register(
            "reorder_buffer_lines",
            "Finished lines waiting for an earlier line",
            m.reorder_lines.clone(),
        );
        registry.register(
            "reorder_buffer_bytes",
            "Bytes of results in the reorder buffer",
            m.reorder_bytes.clone(),
        );
        registry.register(
            "journal_entries",
            "Engine responses held for unfinished lines (the journal)",
            m.journal_entries.clone(),
        );
        registry.register(
            "journal_bytes",
            "Bytes of the journal's entries",
            m.journal_bytes.clone(),
        );
        registry.register(
            "journal_replayed_requests",
            "Engine requests workers answered from a journal instead of the engine",
            m.journal_replayed.clone(),
        );
        registry.register(
            "journal_tokens_saved",
            "Engine tokens (prompt and completion) the replayed requests had cost",
            m.journal_tokens_saved.clone(),
        );
        registry.register(
            "workers_seen",
            "Workers that made a request to this run of the server (those that name themselves)",
            m.workers_seen.clone(),
        );
        registry.register(
            "workers_active",
            "Workers heard from in the last 60 s",
            m.workers_active.clone(),
        );
        registry.register(
            "group_lookahead_lines",
            "Lines read ahead by group key (--group-by) and not issued yet",
            m.group_waiting.clone(),
        );
        registry.register(
            "group_keys",
            "Group keys the server keeps (--group-by)",
            m.group_keys.clone(),
        );
        registry.register(
            "group_lines_issued",
            "Lines with a group key issued: to a worker that had the key (owner), opening a key for a worker (new), or shared out of another worker's large group (spread)",
            m.group_issued.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer a request, by endpoint",
            family,
        );
        ServerMetrics {
            registry,
            latency,
            ..m
        }
    }
}

/// The server's endpoints, each with its own latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /work`.
    Work,
    /// `POST /results`.
    Results,
    /// `POST /release`.
    Release,
    /// `GET /status`.
    Status,
    /// `POST /work_timeout`.
    WorkTimeout,
    /// `GET /metrics`.
    Metrics,
    /// `POST /heartbeat`.
    Heartbeat,
    /// `GET /health`.
    Health,
    /// `POST /journal`.
    Journal,
    /// `POST /hello`.
    Hello,
    /// `GET /` and `/page.js`: the job page.
    Page,
}

impl Endpoint {
    /// Every endpoint, in declaration order.
    pub const ALL: [Endpoint; 11] = [
        Endpoint::Work,
        Endpoint::Results,
        Endpoint::Release,
        Endpoint::Status,
        Endpoint::WorkTimeout,
        Endpoint::Metrics,
        Endpoint::Heartbeat,
        Endpoint::Health,
        Endpoint::Journal,
        Endpoint::Hello,
        Endpoint::Page,
    ];

    /// Its path, the `endpoint` label of its latency series.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Work => "/work",
            Endpoint::Results => "/results",
            Endpoint::Release => "/release",
            Endpoint::Status => "/status",
            Endpoint::WorkTimeout => "/work_timeout",
            Endpoint::Metrics => "/metrics",
            Endpoint::Heartbeat => "/heartbeat",
            Endpoint::Health => "/health",
            Endpoint::Journal => "/journal",
            Endpoint::Hello => "/hello",
            Endpoint::Page => "/",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

// `index` is the declaration order: `ALL` must list the endpoints in it.
const _: () = {
    let mut i = 0;
    while i < Endpoint::ALL.len() {
        assert!(Endpoint::ALL[i] as usize == i);
        i += 1;
    }
};

/// Records a request's latency when dropped.
#[derive(Debug)]
pub struct RequestTimer<'a> {
    histogram: &'a Histogram,
    start: std::time::Instant,
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

impl ServerMetrics {
    /// Starts timing a request to `endpoint`.
    pub fn time(&self, endpoint: Endpoint) -> RequestTimer<'_> {
        RequestTimer {
            histogram: &self.latency[endpoint.index()],
            start: std::time::Instant::now(),
        }
    }

    /// Workers answered `replayed` requests from journals, worth `tokens` engine tokens.
    pub fn journal_replayed(&self, replayed: u64, tokens: u64) {
        // Saturating: the counts come from workers.
        let add = |c: &Counter, n: u64| {
            c.inc_by(n.min(u64::MAX - c.get()));
        };
        add(&self.journal_replayed, replayed);
        add(&self.journal_tokens_saved, tokens);
    }

    /// The workers seen and active, for the next render.
    pub fn workers(&self, seen: u64, active: usize) {
        self.workers_seen
            .set(i64::try_from(seen).unwrap_or(i64::MAX));
        self.workers_active.set(active as i64);
    }

    /// The metrics as Prometheus text, updated from `stats`.
    pub fn render(&self, stats: &LedgerStats) -> String {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let before = last.as_ref();
        let delta =
            |now: u64, then: fn(&LedgerStats) -> u64| now.saturating_sub(before.map_or(0, then));
        self.issued
            .inc_by(delta(stats.issued_total, |s| s.issued_total));
        self.completed
            .inc_by(delta(stats.completed_total, |s| s.completed_total));
        self.tombstones
            .inc_by(delta(stats.tombstones, |s| s.tombstones));
        self.ignored
            .inc_by(delta(stats.ignored_results, |s| s.ignored_results));
        let cause = |c: &str| CauseLabel {
            cause: c.to_string(),
        };
        self.reissues
            .get_or_create(&cause("timeout"))
            .inc_by(delta(stats.reissues.timeout, |s| s.reissues.timeout));
        self.reissues
            .get_or_create(&cause("release"))
            .inc_by(delta(stats.reissues.release, |s| s.reissues.release));
        for (kind, &n) in &stats.failed_by_kind {
            let then = before.and_then(|b| b.failed_by_kind.get(kind)).copied();
            self.failed
                .get_or_create(&KindLabel { kind: kind.clone() })
                .inc_by(n.saturating_sub(then.unwrap_or(0)));
        }
        // Kinds past those listed, as one series.
        if stats.failed_unlisted > 0 {
            self.failed
                .get_or_create(&KindLabel {
                    kind: UNLISTED_KIND.into(),
                })
                .inc_by(delta(stats.failed_unlisted, |s| s.failed_unlisted));
        }
        self.lines_done.set(stats.lines_written as i64);
        self.in_flight.set(stats.in_flight as i64);
        self.queued.set(stats.queued_for_reissue as i64);
        self.reorder_lines.set(stats.reorder_lines as i64);
        self.reorder_bytes.set(stats.reorder_bytes as i64);
        self.journal_entries.set(stats.journal.entries as i64);
        self.journal_bytes.set(stats.journal.bytes as i64);
        if let Some(g) = stats.groups {
            let then = before.and_then(|b| b.groups).unwrap_or_default();
            let to = |to: &str| GroupLabel { to: to.to_string() };
            let new = |g: GroupStatus| g.issued - g.to_owner - g.spread;
            self.group_issued
                .get_or_create(&to("owner"))
                .inc_by(g.to_owner.saturating_sub(then.to_owner));
            self.group_issued
                .get_or_create(&to("new"))
                .inc_by(new(g).saturating_sub(new(then)));
            self.group_issued
                .get_or_create(&to("spread"))
                .inc_by(g.spread.saturating_sub(then.spread));
            self.group_waiting.set(g.waiting as i64);
            self.group_keys.set(g.keys as i64);
        }
        *last = Some(stats.clone());
        text(&self.registry)
    }
}
