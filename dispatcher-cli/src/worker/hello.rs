//! Who this worker is: its hello to the server (task, engine, model,
//! settings, the batch job it runs in) and the host's name.

use std::sync::Arc;
use std::time::Duration;

use dispatcher_core::client::ClientError;
use dispatcher_core::engine::spawn::RunningEngine;
use dispatcher_core::task::source::{SourceError, WorkSource};
use dispatcher_core::task::{DynTask, Engines};

use super::EngineArgs;

/// Tells the source who this worker is and how it makes lines (a server
/// lists it in `/status` and its manifest). A server without `/hello` (the
/// Python one) is fine: the worker works the same.
pub(super) async fn say_hello(
    task: &'static dyn DynTask,
    engine_args: &EngineArgs,
    engine: &RunningEngine,
    engines: &Engines,
    source: &Arc<dyn WorkSource>,
) {
    let mut settings = task.settings();
    let named: Vec<String> = engines.load().into_iter().skip(1).map(|e| e.name).collect();
    if !named.is_empty() {
        settings.insert("named_engines".into(), named.into());
    }
    let hello = dispatcher_core::protocol::Hello {
        worker: String::new(),
        host: hostname(),
        task: task.name().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        engine: engine_args
            .urls
            .default_url()
            .map_or_else(|| engine.kind().name().to_string(), String::from),
        model: engines.default_model(),
        settings,
        job: ["DISPATCHER_LAUNCH_JOB", "SLURM_JOB_ID"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|id| !id.is_empty())),
    };
    match tokio::time::timeout(Duration::from_secs(10), source.hello(hello)).await {
        Ok(Ok(())) => {}
        // A server that knows hellos and refused this one: say why (the
        // Python server knows none, and answers 404).
        Ok(Err(SourceError::Client(ClientError::Status { status, body, .. })))
            if status.as_u16() != 404 =>
        {
            tracing::warn!(
                "the server did not take this worker's hello ({status}: {body}); the job page and the manifest will not name its task and settings; going on"
            );
        }
        Ok(Err(e)) => tracing::debug!("the server did not take the hello ({e}); going on"),
        Err(_) => tracing::debug!("the server did not answer the hello in 10 s; going on"),
    }
}

/// This machine's name, for the hello (and launch's records); empty when
/// neither /proc nor HOSTNAME says.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}
