//! The edge under hostile clients: each module is one audit's attack list or one class of
//! abuse, over real sockets against a running gateway (or the real binary as a child process)
//! in front of recording upstreams. Run one file's tests with
//! `cargo test --test edge hostile_conn::`.

#[path = "../support/mod.rs"]
mod support;

mod hostile_audit;
mod hostile_conn;
mod hostile_http;
mod hostile_listeners;
mod hostile_process;
mod hostile_second_audit;
mod hostile_slow_readers;
mod memory_cap;
mod process_signals;
