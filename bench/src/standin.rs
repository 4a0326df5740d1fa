//! A stateless server that speaks the work protocol: every GET /work returns a
//! fresh batch with prompt-shaped content, every POST /results is parsed and
//! counted. Same HTTP stack and JSON as the real server, none of its state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use dispatcher_core::protocol::{
    ResultsRequest, ResultsResponse, WorkItem, WorkResponse, WorkStatus,
};

#[derive(Debug, clap::Args)]
pub struct StandinArgs {
    /// Address to bind (port 0 picks one; printed as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: String,
}

#[derive(Debug, serde::Deserialize)]
struct Q {
    batch_size: Option<usize>,
}

pub async fn run(args: StandinArgs) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/work",
            get(|State(next): State<Arc<AtomicU64>>, Query(q): Query<Q>| async move {
                let n = q.batch_size.unwrap_or(1) as u64;
                let first = next.fetch_add(n, Ordering::Relaxed);
                Json(WorkResponse {
                    status: WorkStatus::Ok,
                    retry_in: None,
                    lease_secs: Some(1200.0),
                    drained: false,
                    items: (first..first + n)
                        .map(|i| WorkItem {
                            work_id: i,
                            content: format!("{{\"id\": {i}, \"prompt\": \"Summarize document number {i} in one sentence.\"}}"),
                            result: None,
                            retry_count: 0,
                            max_retries: Some(3),
                            journal: None,
                        })
                        .collect(),
                })
            }),
        )
        .route(
            "/results",
            post(|body: Bytes| async move {
                let req: ResultsRequest = serde_json::from_slice(&body).unwrap_or(ResultsRequest { items: Vec::new(), worker: None, usage: None });
                Json(ResultsResponse {
                    status: "OK".into(),
                    count: req.items.len() as u64,
                    ignored: 0,
                    already_done: Vec::new(),
                    invalid: Vec::new(),
                })
            }),
        )
        .with_state(next);
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
