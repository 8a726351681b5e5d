//! The simulated DeltaStream backends over real HTTP and WebSockets, each served in-process
//! on `127.0.0.1:0`. Run one file's tests with `cargo test --test sim sim_socket::`.

#[path = "../support/mod.rs"]
mod support;

mod sim_services;
mod sim_socket;
