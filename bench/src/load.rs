//! The load generator.

use std::time::{Duration, Instant};

use dispatcher_core::protocol::{ResultsRequest, WorkResponse, WorkStatus};

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

async fn worker(addr: String, batch: usize, warm: Instant, end: Instant) -> anyhow::Result<Tally> {
    let mut conn = Conn::connect(&addr).await?;
    let mut t = Tally::default();
    let path = format!("/work?batch_size={batch}");
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
        let body = serde_json::to_vec(&ResultsRequest { items: work.items })?;
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
        .map(|_| tokio::spawn(worker(args.addr.clone(), args.batch, warm, end)))
        .collect();
    let mut all = Tally::default();
    for h in handles {
        let t = h.await??;
        all.items += t.items;
        all.get_us.extend(t.get_us);
        all.post_us.extend(t.post_us);
    }
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
    println!(
        "{} workers={} batch={} idle={idle_open} items_per_sec={:.0} get_p50_ms={:.2} get_p99_ms={:.2} post_p50_ms={:.2} post_p99_ms={:.2}",
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
