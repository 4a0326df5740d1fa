//! End-to-end tests of the facade crate: one test binary, one module per area.

mod after_run;
mod answers;
mod batch;
mod dataset_columns;
mod datasets;
mod examples_e2e;
mod export;
mod grouping;
mod hosted;
mod infer;
mod journal;
mod launch;
mod llama;
mod own_crate;
mod page;
mod release;
mod server_e2e;
mod slurm;
mod support;
mod tasks;
mod tokens;
mod ui;
mod vllm;
mod worker;
