//! `dispatcher status` and `dispatcher work-timeout`: a running server, from a shell.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use dispatcher_core::client::{check_addr, DispatcherClient};
use dispatcher_core::protocol::StatusResponse;

/// Where the server is.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The dispatcher server, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", env = "DISPATCHER_SERVER", value_parser = check_addr)]
    pub server: String,
    /// Its access token, if it requires one.
    #[command(flatten)]
    pub access: crate::access::TokenArgs,
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<DispatcherClient> {
        Ok(DispatcherClient::with_token(
            &self.server,
            self.access.resolve()?.as_deref(),
        ))
    }
}

/// Flags of `dispatcher status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The server.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Print again every --interval seconds until the server exits.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between samples (the rate is measured over one interval),
    /// from 0.1 to 3600.
    #[arg(long, value_name = "SECS", default_value_t = 2.0, value_parser = interval_secs)]
    pub interval: f64,
    /// Print the server's JSON instead.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `dispatcher work-timeout`.
#[derive(Debug, Clone, Args)]
pub struct WorkTimeoutArgs {
    /// The server.
    #[command(flatten)]
    pub server: ServerArgs,
    /// The new work timeout, in seconds; it applies to items in flight too.
    pub secs: f64,
}

/// Runs `dispatcher work-timeout`.
pub async fn work_timeout(args: WorkTimeoutArgs) -> anyhow::Result<()> {
    let reply = args
        .server
        .client()?
        .set_work_timeout(args.secs)
        .await
        .context("could not change the work timeout")?;
    println!("{}", reply.message);
    Ok(())
}

/// Runs `dispatcher status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    let interval = Duration::from_secs_f64(args.interval);
    // The client's errors name the server, and say whether it was out of
    // reach or refused the token.
    let fetch = || async { client.status().await.map_err(anyhow::Error::from) };
    let mut previous = fetch().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&previous)?);
        if !args.watch {
            return Ok(());
        }
    }
    loop {
        tokio::time::sleep(interval).await;
        let current = match fetch().await {
            Ok(s) => s,
            // A server exits by itself a few seconds after the job is
            // complete; gone before that, it was stopped or died.
            Err(_) if args.watch && previous.complete => {
                println!("the job is complete and the server has exited");
                return Ok(());
            }
            Err(e) if args.watch => {
                let total = previous
                    .lines_total
                    .map_or_else(|| "?".to_string(), |t| t.to_string());
                return Err(e.context(format!(
                    "the server no longer answers, and the job was not complete when it last did ({} of {total} lines): it was stopped or died; rerun its serve (or launch) command to resume, and see `dispatcher report` on the output for what was written",
                    previous.lines_done
                )));
            }
            Err(e) => return Err(e),
        };
        if args.json {
            println!("{}", serde_json::to_string(&current)?);
        } else {
            print!("{}", render(&previous, &current, interval));
        }
        if !args.watch {
            return Ok(());
        }
        previous = current;
    }
}

/// `--interval`: seconds, a number from 0.1 to 3600.
fn interval_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.1..=3600.0).contains(&secs) => Ok(secs),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 3600")),
    }
}

/// The human-readable status between two samples `interval` apart.
pub fn render(before: &StatusResponse, now: &StatusResponse, interval: Duration) -> String {
    let secs = interval.as_secs_f64();
    let rate = now.lines_done.saturating_sub(before.lines_done) as f64 / secs;
    let byte_rate = now
        .input_bytes_consumed
        .saturating_sub(before.input_bytes_consumed) as f64
        / secs;
    let total = now
        .lines_total
        .map_or_else(|| "?".to_string(), |t| t.to_string());
    let percent = if now.input_bytes_total > 0 {
        100.0 * now.input_bytes_consumed as f64 / now.input_bytes_total as f64
    } else {
        100.0
    };
    let eta = if now.complete {
        "done".to_string()
    } else if let (Some(total), true) = (now.lines_total, rate > 0.0) {
        // In lines, once the total is known: what users count.
        human_secs(total.saturating_sub(now.lines_done) as f64 / rate)
    } else if byte_rate > 0.0 {
        human_secs(
            now.input_bytes_total
                .saturating_sub(now.input_bytes_consumed) as f64
                / byte_rate,
        )
    } else {
        "unknown (no progress in the last interval)".to_string()
    };
    let blocking = now.blocking.as_ref().map_or_else(
        || "none".to_string(),
        |b| {
            format!(
                "work_id {} ({}, first issued {} ago) holds back {} finished lines",
                b.work_id,
                b.state,
                human_secs(b.age_secs),
                b.waiting_lines
            )
        },
    );
    let oldest = now.oldest_in_flight.as_ref().map_or_else(
        || "none".to_string(),
        |o| {
            format!(
                "work_id {} for {} (reissued {} times)",
                o.work_id,
                human_secs(o.age_secs),
                o.retry_count
            )
        },
    );
    let mut out = format!(
        "lines done   {} / {total}  (input read {percent:.1}%)\n\
         rate         {rate:.1} lines/s   ETA {eta}\n\
         in flight    {} (queued for reissue {})   reorder buffer {} lines, {} bytes\n\
         reissues     timeout {}, release {}, task retry {}   tombstones {}   invalid lines {}\n\
         oldest       {oldest}\n\
         blocking     {blocking}\n",
        now.lines_done,
        now.in_flight,
        now.queued_for_reissue,
        now.reorder_buffer,
        now.reorder_buffer_bytes,
        now.reissues.timeout,
        now.reissues.release,
        now.reissues.retry,
        now.tombstones,
        now.invalid_lines,
    );
    let tokens_rate = |now_n: u64, before_n: u64| now_n.saturating_sub(before_n) as f64 / secs;
    out.push_str(&format!(
        "tokens       {} prompt ({:.0}/s), {} generated ({:.0}/s) in {} engine requests{}\n",
        now.tokens.prompt_tokens,
        tokens_rate(now.tokens.prompt_tokens, before.tokens.prompt_tokens),
        now.tokens.completion_tokens,
        tokens_rate(
            now.tokens.completion_tokens,
            before.tokens.completion_tokens
        ),
        now.tokens.requests,
        now.cost.map_or_else(String::new, |c| {
            let projected = c
                .projected
                .map_or_else(String::new, |p| format!(" of ~{p:.2} projected"));
            format!("; cost so far {:.4}{projected}", c.so_far)
        }),
    ));
    out.push_str(&format!(
        "journal      {} entries, {} bytes held ({} not recorded: full)   replayed {} requests, {} engine tokens saved\n",
        now.journal_entries,
        now.journal_bytes,
        now.journal_dropped,
        now.journal_replayed,
        now.journal_tokens_saved
    ));
    if !now.failed_by_kind.is_empty() {
        let mut by_count: Vec<(&String, &u64)> = now.failed_by_kind.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let kinds: Vec<String> = by_count
            .iter()
            .map(|(k, n)| format!("{} {n}", shown(k)))
            .collect();
        out.push_str(&format!("failed       {}", kinds.join(", ")));
        if now.failed_unlisted > 0 {
            out.push_str(&format!(
                ", and {} lines of other kinds (not listed: the server lists 100 kinds)",
                now.failed_unlisted
            ));
        }
        out.push('\n');
        for (kind, _) in by_count.into_iter().take(FAILURE_ROWS) {
            if let Some(e) = now.failure_examples.get(kind) {
                out.push_str(&format!(
                    "  {:<26} e.g. work_id {}: {}\n",
                    shown(kind),
                    e.work_id,
                    one_line(&e.line, 100)
                ));
            }
        }
    }
    if !now.shards.is_empty() {
        let complete = now.shards.iter().filter(|s| s.done == s.lines).count();
        let writing = now
            .shards
            .iter()
            .find(|s| s.done < s.lines)
            .map_or_else(String::new, |s| {
                format!(
                    "; writing {} ({} / {})",
                    dispatcher_core::text::escaped(&s.path, 500),
                    s.done,
                    s.lines
                )
            });
        out.push_str(&format!(
            "shards       {complete} of {} complete{writing}\n",
            now.shards.len()
        ));
    }
    if let Some(g) = &now.groups {
        let share = |n: u64| {
            if g.issued == 0 {
                0.0
            } else {
                100.0 * n as f64 / g.issued as f64
            }
        };
        out.push_str(&format!(
            "groups       {} keys, {} lines read ahead; of {} issued, {:.1}% to the worker that had the key, {:.1}% shared out of a large group\n",
            g.keys,
            g.waiting,
            g.issued,
            share(g.to_owner),
            share(g.spread)
        ));
        if g.keyless > 0 {
            out.push_str(&format!(
                "             {} lines read had no key (--group-by found nothing in them): they go out in input order\n",
                g.keyless
            ));
        }
    }
    if let Some(c) = &now.prefix_cache {
        out.push_str(&format!(
            "prefix cache {:.1}% of {} prompt tokens found cached by the engines that report it\n",
            100.0 * c.hit_rate(),
            c.queries
        ));
    }
    out.push_str(&render_workers(now));
    out
}

/// Failure kinds `dispatcher status` shows an example line of, at most (the
/// most frequent).
const FAILURE_ROWS: usize = 10;

/// Text from a worker or an input line, as the terminal is to show it: at
/// most 64 bytes, no control character (see `dispatcher_core::text`).
fn shown(text: &str) -> String {
    dispatcher_core::text::escaped(text, 64)
}

/// Worker rows `dispatcher status` prints at most: a job of 1,000 workers
/// would scroll the rest of the status away at every `--watch` refresh.
const WORKER_ROWS: usize = 30;

/// The workers seen: how many in each state, then one per line, those that
/// need a look first (silent, gone), at most [`WORKER_ROWS`]: who (task,
/// host, engine, model, version from its hello; `unknown` without one),
/// state, last contact, lines done, in flight, tokens/s, prefix cache.
fn render_workers(now: &StatusResponse) -> String {
    if now.workers.is_empty() && now.workers_unlisted == 0 {
        return "workers      none seen yet\n".to_string();
    }
    // The gone ones the server left out count as gone.
    let count = |state: &str| {
        let listed = now.workers.iter().filter(|w| w.state == state).count() as u64;
        listed
            + if state == "gone" {
                now.workers_unlisted
            } else {
                0
            }
    };
    let by_state: Vec<String> = ["active", "idle", "silent", "gone"]
        .into_iter()
        .map(|state| (state, count(state)))
        .filter(|(_, n)| *n > 0)
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    let mut out = format!(
        "workers      {} seen: {}\n",
        now.workers.len() as u64 + now.workers_unlisted,
        by_state.join(", ")
    );
    // Silent ones first (alive a minute ago, maybe not now), then gone, then
    // the rest; each group as the server lists it (last heard from first).
    let rank = |state: &str| match state {
        "silent" => 0,
        "gone" => 1,
        _ => 2,
    };
    let mut rows: Vec<_> = now.workers.iter().collect();
    rows.sort_by_key(|w| rank(&w.state));
    for w in rows.iter().take(WORKER_ROWS) {
        let who = w.hello.as_ref().map_or_else(
            || "unknown (said no hello)".to_string(),
            |h| {
                format!(
                    "{} on {} ({} {}, {})",
                    shown(&h.task),
                    if h.host.is_empty() {
                        "?".into()
                    } else {
                        shown(&h.host)
                    },
                    shown(&h.engine),
                    shown(h.model.as_deref().unwrap_or("?")),
                    shown(&h.version)
                )
            },
        );
        let cache = w.prefix_cache.map_or_else(String::new, |c| {
            format!(", prefix cache {:.1}% hit", 100.0 * c.hit_rate())
        });
        let rate = w
            .tokens_per_sec
            .map_or_else(String::new, |r| format!(", {r:.0} tokens/s"));
        out.push_str(&format!(
            "  {:<28} {who}: {}, last contact {} ago, {} lines done, {} in flight{rate}{cache}\n",
            shown(&w.worker),
            if w.state.is_empty() {
                "?".into()
            } else {
                shown(&w.state)
            },
            human_secs(w.last_contact_secs),
            w.lines_done,
            w.in_flight
        ));
    }
    let more = rows.len().saturating_sub(WORKER_ROWS) as u64 + now.workers_unlisted;
    if more > 0 {
        out.push_str(&format!(
            "  and {more} more (every live one: --json, or the server's page)\n"
        ));
    }
    out
}

/// The first `max` characters of `text`, `...` when there were more, with
/// control characters escaped: one line of a terminal, whatever it holds.
pub(crate) fn one_line(text: &str, max: usize) -> String {
    let head = match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    };
    let mut out = dispatcher_core::text::Escaped(head).to_string();
    if head.len() < text.len() {
        out.push_str("...");
    }
    out
}

/// Seconds as people read them: `42s`, `3m 05s`, `2h 10m`.
pub(crate) fn human_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/status` answer with `workers` (name, state) and `unlisted` gone
    /// ones left out by the server.
    fn status(workers: &[(&str, &str)], unlisted: u64) -> StatusResponse {
        let rows: Vec<serde_json::Value> = workers
            .iter()
            .map(|(name, state)| {
                serde_json::json!({"worker": name, "hello": null, "last_contact_secs": 1.0,
                    "lines_done": 0, "in_flight": 0, "state": state})
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "last_processed_work_id": -1, "next_work_id": 0, "issued": 0, "pending": 0,
            "heap_size": 0, "expired_reissues": 0, "lines_done": 0,
            "input_bytes_consumed": 0, "input_bytes_total": 0, "in_flight": 0,
            "queued_for_reissue": 0, "reorder_buffer": 0, "reorder_buffer_bytes": 0,
            "reissues": {"timeout": 0, "release": 0}, "tombstones": 0, "invalid_lines": 0,
            "ignored_results": 0, "work_timeout_secs": 600.0, "max_retries": 3,
            "complete": false, "uptime_secs": 1.0,
            "workers": rows, "workers_unlisted": unlisted,
        }))
        .unwrap()
    }

    /// A job of many workers: the counts by state, then the ones that need a
    /// look first, and no more than a screen of rows.
    #[test]
    fn many_workers_show_as_counts_and_the_silent_first() {
        let names: Vec<String> = (0..100).map(|i| format!("w{i:03}")).collect();
        let mut workers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "active")).collect();
        workers[40].1 = "idle";
        workers[70].1 = "silent";
        workers[99].1 = "gone";
        let text = render_workers(&status(&workers, 12));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "workers      112 seen: 97 active, 1 idle, 1 silent, 13 gone"
        );
        assert!(lines[1].trim_start().starts_with("w070 "), "{text}");
        assert!(lines[2].trim_start().starts_with("w099 "), "{text}");
        assert!(lines[3].trim_start().starts_with("w000 "), "{text}");
        assert_eq!(lines.len(), 1 + WORKER_ROWS + 1, "{text}");
        assert_eq!(
            lines.last().unwrap(),
            &"  and 82 more (every live one: --json, or the server's page)"
        );
        // A few workers: every one, and nothing more.
        let text = render_workers(&status(&[("a", "active"), ("b", "idle")], 0));
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.starts_with("workers      2 seen: 1 active, 1 idle\n"),
            "{text}"
        );
    }
}
