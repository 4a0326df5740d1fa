//! The load generator.

use std::time::{Duration, Instant};

use dispatcher_core::protocol::{ResultsRequest, TokenCounts, WorkResponse, WorkStatus};

use crate::http::Conn;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Server address HOST:PORT.
    #[arg(long)]
    addr: String,
    /// Concurrent workers (one connection each).
    #[arg(long)]
    workers: usize,
    /// batch_size of each work request.
    #[arg(long)]
    batch: usize,
    /// Seconds to measure, after a one-second warm-up.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// A label for the result line.
    #[arg(long, default_value = "")]
    label: String,
    /// Idle keep-alive connections besides the workers' (a cluster's workers
    /// that wait on their engines): each makes a request when it opens and
    /// every --idle-every seconds after, and stays open until the end.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Seconds between an idle connection's requests (keep it under the
    /// server's --idle-timeout).
    #[arg(long, default_value_t = 20.0)]
    idle_every: f64,
    /// Workers name themselves (`worker=bench-N`) and report tokens with
    /// their results, as dispatcher's own workers do: the server keeps a
    /// row per worker, which `/status` lists.
    #[arg(long)]
    named: bool,
    /// Open job pages besides the workers: each loads the page and polls
    /// `/status` as the page does (once a second with `max_age=1`, with the
    /// history every 15th time).
    #[arg(long, default_value_t = 0)]
    pages: usize,
}

/// One open job page: the page and its script, then `/status` as the page
/// polls it, until `end`. The latencies of its status requests, in µs.
async fn page(addr: String, end: Instant) -> anyhow::Result<Vec<u32>> {
    let mut conn = Conn::connect(&addr).await?;
    for path in ["/", "/page.js"] {
        let (status, _) = conn.request("GET", path, b"").await?;
        anyhow::ensure!(status == 200, "GET {path} answered {status}");
    }
    let mut latencies = Vec::new();
    for poll in 0_u64.. {
        let next = Instant::now() + Duration::from_secs(1);
        if next >= end {
            break;
        }
        let path = if poll % 15 == 0 {
            "/status?max_age=1&history=1"
        } else {
            "/status?max_age=1"
        };
        let t0 = Instant::now();
        let (status, _) = conn.request("GET", path, b"").await?;
        anyhow::ensure!(status == 200, "GET {path} answered {status}");
        latencies.push(t0.elapsed().as_micros() as u32);
        tokio::time::sleep_until(next.into()).await;
    }
    Ok(latencies)
}

/// One idle connection: `GET /health` now and every `every`, until `end`.
async fn idle_connection(addr: String, every: Duration, end: Instant) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    let mut buf = [0u8; 512];
    loop {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nhost: bench\r\n\r\n")
            .await?;
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "GET /health answered {:?}",
            String::from_utf8_lossy(&buf[..n.min(40)])
        );
        let next = Instant::now() + every;
        if next >= end {
            tokio::time::sleep_until(end.into()).await;
            return Ok(());
        }
        tokio::time::sleep_until(next.into()).await;
    }
}

#[derive(Debug, Default)]
struct Tally {
    items: u64,
    get_us: Vec<u32>,
    post_us: Vec<u32>,
}

async fn worker(
    addr: String,
    batch: usize,
    name: Option<String>,
    warm: Instant,
    end: Instant,
) -> anyhow::Result<Tally> {
    let mut conn = Conn::connect(&addr).await?;
    let mut t = Tally::default();
    let path = match &name {
        Some(name) => format!("/work?batch_size={batch}&worker={name}"),
        None => format!("/work?batch_size={batch}"),
    };
    while Instant::now() < end {
        let t0 = Instant::now();
        let (status, body) = conn.request("GET", &path, b"").await?;
        let t1 = Instant::now();
        anyhow::ensure!(status == 200, "GET /work answered {status}");
        let mut work: WorkResponse = serde_json::from_slice(&body)?;
        match work.status {
            WorkStatus::Ok => {}
            WorkStatus::Retry => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            _ => break,
        }
        let n = work.items.len() as u64;
        for item in &mut work.items {
            item.result = Some(std::mem::take(&mut item.content));
        }
        // A named worker reports what its engine used, as dispatcher's do.
        let usage = name.as_ref().map(|_| TokenCounts {
            requests: n,
            prompt_tokens: 100 * n,
            completion_tokens: 20 * n,
        });
        let body = serde_json::to_vec(&ResultsRequest {
            items: work.items,
            worker: name.clone(),
            usage,
        })?;
        let t2 = Instant::now();
        let (status, _) = conn.request("POST", "/results", &body).await?;
        let t3 = Instant::now();
        anyhow::ensure!(status == 200, "POST /results answered {status}");
        if t0 >= warm {
            t.items += n;
            t.get_us.push((t1 - t0).as_micros() as u32);
            t.post_us.push((t3 - t2).as_micros() as u32);
        }
    }
    Ok(t)
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    // The idle connections open first (in waves, as a cluster's workers
    // start), and stay open until the measurement is over.
    let idle_until = Instant::now() + Duration::from_secs(3600);
    let mut idle = tokio::task::JoinSet::new();
    for wave in (0..args.idle).collect::<Vec<_>>().chunks(500) {
        for _ in wave {
            idle.spawn(idle_connection(
                args.addr.clone(),
                Duration::from_secs_f64(args.idle_every),
                idle_until,
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = Instant::now();
    let warm = start + Duration::from_secs(1);
    let end = warm + Duration::from_secs_f64(args.secs);
    let handles: Vec<_> = (0..args.workers)
        .map(|i| {
            let name = args.named.then(|| format!("bench-{i}"));
            tokio::spawn(worker(args.addr.clone(), args.batch, name, warm, end))
        })
        .collect();
    let pages: Vec<_> = (0..args.pages)
        .map(|_| tokio::spawn(page(args.addr.clone(), end)))
        .collect();
    let mut all = Tally::default();
    for h in handles {
        let t = h.await??;
        all.items += t.items;
        all.get_us.extend(t.get_us);
        all.post_us.extend(t.post_us);
    }
    let mut page_us = Vec::new();
    for p in pages {
        page_us.extend(p.await??);
    }
    page_us.sort_unstable();
    // Every idle connection must still be open and answered.
    let idle_open = idle.len();
    while let Some(joined) = idle.try_join_next() {
        joined??;
    }
    idle.abort_all();
    let measured = Instant::now()
        .saturating_duration_since(warm)
        .as_secs_f64()
        .max(1e-9);
    all.get_us.sort_unstable();
    all.post_us.sort_unstable();
    let pages = if args.pages > 0 {
        format!(
            " pages={} status_polls={} status_p50_ms={:.2} status_p99_ms={:.2}",
            args.pages,
            page_us.len(),
            pct(&page_us, 0.5),
            pct(&page_us, 0.99)
        )
    } else {
        String::new()
    };
    println!(
        "{} workers={} batch={} idle={idle_open} items_per_sec={:.0} get_p50_ms={:.2} get_p99_ms={:.2} post_p50_ms={:.2} post_p99_ms={:.2}{pages}",
        args.label,
        args.workers,
        args.batch,
        all.items as f64 / measured,
        pct(&all.get_us, 0.5),
        pct(&all.get_us, 0.99),
        pct(&all.post_us, 0.5),
        pct(&all.post_us, 0.99),
    );
    Ok(())
}
