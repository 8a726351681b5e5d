//! The gateway as its clients see it: routing and the error contract, the OpenAPI document
//! and the answers it promises, WebSocket routes, TLS and reloads, and the demo walkthrough.
//! Run one file's tests with `cargo test --test gateway gateway_core::`.

#[path = "../support/mod.rs"]
mod support;

mod demo_walkthrough;
mod gateway_core;
mod openapi_and_panics;
mod openapi_contract;
mod tls_reload;
mod upstream_request;
mod websocket;
mod wire;
mod ws_silent;
