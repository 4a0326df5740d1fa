//! End-to-end tests of the facade crate: one test binary, one module per area.

mod server_e2e;
