//! End-to-end tests of the facade crate: one test binary, one module per area.

mod examples_e2e;
mod infer;
mod server_e2e;
mod tasks;
mod ui;
mod worker;
