//! The subcommands of `dispatcher`, one module each: [`serve`] (the
//! head-node server), [`infer`] (prompt in, responses out), [`batch`]
//! (`run-batch`, OpenAI batch files), [`report`] (a job's output, counted),
//! [`status`] (`status` and `work-timeout` of a running server), [`slurm`]
//! (`slurm-script`), [`export`] (an output as Parquet), [`launch`] (a job
//! that runs itself on Slurm), [`estimate`] (a job's tokens and cost before it runs),
//! [`docs`] (completions, man and reference pages). Each holds its flags and its `run`; the worker runtime
//! they share is [`crate::worker`].

pub mod batch;
pub mod docs;
#[cfg(feature = "tokenizer")]
pub mod estimate;
#[cfg(feature = "parquet")]
pub mod export;
pub mod infer;
pub mod launch;
pub mod report;
pub mod serve;
pub mod slurm;
pub mod status;
