//! What operators run and read: configuration files and `check-config`, the metrics scrape,
//! the OTLP export, the images' health-check probe, the Grafana dashboard and alert rules, the registry Dockerfile, and a
//! reload under steady load. No test here opens a breaker on a shared upstream name or serves
//! TLS besides the expiry test, so the scrape's process-wide gauges stay this binary's own.
//! Run one file's tests with `cargo test --test ops metrics_scrape::`.

#[path = "../support/mod.rs"]
mod support;

mod config;
mod dashboard;
mod dockerfile;
mod first_run;
mod metrics_scrape;
mod otlp_export;
mod probe;
mod reload_under_load;
