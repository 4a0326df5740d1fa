//! `GET /status`: the job as the ledger, the workers seen and the progress
//! history tell it, and the protocol's fields of it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::time::Instant;

use super::access::NotCrossSite;
use super::error::ApiError;
use super::state::AppState;
use crate::ledger::LedgerStats;
use crate::metrics::Endpoint;
use crate::protocol::StatusResponse;

/// `GET /status`'s options.
#[derive(Debug, Default, Deserialize)]
pub(super) struct StatusQuery {
    /// `1` (or `true`): include the progress history.
    history: Option<String>,
    /// An answer made up to this many seconds ago will do (the page asks
    /// with 1, so that any number of open pages cost one answer a second).
    /// Not a number: a fresh answer.
    max_age: Option<String>,
}

pub(super) async fn get_status(
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let _t = state.metrics.time(Endpoint::Status);
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let history = matches!(query.history.as_deref(), Some("1" | "true"));
    let max_age = query
        .max_age
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(60.0)));
    let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
    let slot = usize::from(history);
    if let Some(max_age) = max_age {
        let cache = state.status_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((made, body)) = &cache[slot] {
            if made.elapsed() <= max_age {
                return Ok((json, body.clone()).into_response());
            }
        }
    }
    let body = Bytes::from(
        serde_json::to_vec(&status_now(&state, history)?).expect("the status serializes"),
    );
    if max_age.is_some() {
        state.status_cache.lock().unwrap_or_else(|e| e.into_inner())[slot] =
            Some((Instant::now(), body.clone()));
    }
    Ok((json, body).into_response())
}

/// The status now; with the progress history when `history`.
fn status_now(state: &AppState, history: bool) -> Result<StatusResponse, ApiError> {
    let (mut stats, load, sources) = state.with_ledger(|l| {
        Ok((
            l.stats(Instant::now()),
            l.load_by_worker(),
            l.config().sources.clone(),
        ))
    })?;
    // Until the ledger has read the input to its end, the count made at start.
    stats.lines_total = stats.lines_total.or(state.input_lines.get().copied());
    let mut status = status_response(&stats);
    if let Some(sources) = sources.filter(|s| s.shards().len() > 1) {
        status.shards = shard_progress(sources.shards(), stats.lines_written);
    }
    {
        let workers = state.workers();
        (status.workers, status.workers_unlisted) =
            workers.status(Instant::now(), &load, stats.work_timeout);
        status.prefix_cache = workers.prefix_cache_total();
    }
    use std::sync::atomic::Ordering::Relaxed;
    status.journal_replayed = state.journal_replayed.load(Relaxed);
    status.journal_tokens_saved = state.journal_tokens_saved.load(Relaxed);
    let now = state.progress(stats.lines_written);
    status.tokens = now.tokens;
    {
        let kept = state.history.lock().unwrap_or_else(|e| e.into_inner());
        status.rates = kept.rates(&now);
        if history {
            let mut samples = kept.samples();
            samples.push(now);
            status.history = Some(samples);
        }
    }
    status.cost = state.prices.map(|prices| {
        let so_far = prices.of(&status.tokens);
        // Tokens of every run (the manifest's) over lines of every run.
        let projected = stats
            .lines_total
            .filter(|_| stats.lines_written > 0)
            .map(|total| so_far * total as f64 / stats.lines_written as f64);
        crate::protocol::Cost {
            prices,
            so_far,
            projected,
        }
    });
    status.eta_secs = stats
        .lines_total
        .filter(|_| !stats.complete)
        .and_then(|total| {
            super::history::eta_secs(total.saturating_sub(stats.lines_written), &status.rates)
        });
    Ok(status)
}

/// Each shard's lines written, when the first `lines_written` lines of the
/// input (the shards' lines one after the other) are.
fn shard_progress(
    shards: &[crate::dataset::StagedShard],
    lines_written: u64,
) -> Vec<crate::protocol::ShardProgress> {
    let mut start = 0_u64;
    shards
        .iter()
        .map(|shard| {
            let done = lines_written.saturating_sub(start).min(shard.lines);
            start += shard.lines;
            crate::protocol::ShardProgress {
                path: shard.path.display().to_string(),
                lines: shard.lines,
                done,
            }
        })
        .collect()
}

/// The `GET /status` answer: the protocol's fields (some of them the Python
/// server's names for the same counts) and then this server's.
pub fn status_response(s: &LedgerStats) -> StatusResponse {
    StatusResponse {
        last_processed_work_id: s.lines_written as i64 - 1,
        next_work_id: s.next_work_id,
        issued: s.in_flight,
        pending: s.reorder_lines,
        heap_size: s.lease_entries,
        expired_reissues: s.reissues.timeout,
        lines_done: s.lines_written,
        lines_total: s.lines_total,
        input_bytes_consumed: s.input_bytes_consumed,
        input_bytes_total: s.input_bytes_total,
        in_flight: s.in_flight,
        queued_for_reissue: s.queued_for_reissue,
        reorder_buffer: s.reorder_lines,
        reorder_buffer_bytes: s.reorder_bytes,
        reissues: s.reissues,
        tombstones: s.tombstones,
        invalid_lines: s.invalid_lines,
        ignored_results: s.ignored_results,
        kept_lines: s.kept_lines,
        failed_by_kind: s.failed_by_kind.clone(),
        failed_unlisted: s.failed_unlisted,
        failure_examples: s.failure_examples.clone(),
        journal_entries: s.journal.entries,
        journal_bytes: s.journal.bytes,
        journal_dropped: s.journal.dropped,
        journal_replayed: 0,
        journal_tokens_saved: 0,
        issued_total: s.issued_total,
        completed_total: s.completed_total,
        oldest_in_flight: s.oldest_in_flight.clone(),
        blocking: s.blocking.clone(),
        reorder_buffer_spilled: s.reorder_spilled,
        backups_issued: s.backups_issued,
        work_timeout_secs: s.work_timeout.as_secs_f64(),
        max_retries: s.max_retries.map_or(-1, i64::from),
        complete: s.complete,
        uptime_secs: s.uptime.as_secs_f64(),
        workers: Vec::new(),
        workers_unlisted: 0,
        prefix_cache: None,
        groups: s.groups,
        tokens: crate::protocol::TokenCounts::default(),
        rates: crate::protocol::Rates::default(),
        eta_secs: None,
        history: None,
        cost: None,
        shards: Vec::new(),
    }
}
